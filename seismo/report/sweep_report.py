"""A sweep read back from the run store: its trials, LR sensitivity, divergence map and the
instability prediction of Wortsman et al. 2023 (arXiv 2309.14322).

``seismo sweep`` stores each trial as a run whose ``meta`` holds ``sweep``, ``intervention``,
``size``, ``lr``, ``seed``, ``n_params``, ``init_loss``, ``final_val_loss`` and
``max_attn_logit`` (see :mod:`seismo.proxy.sweep`); everything here is computed from those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from seismo._stats import fit_power_law, lr_sensitivity
from seismo.report.sweep_plots import capped_final_loss
from seismo.store import RunStore

__all__ = ["SweepTable", "load_sweep", "sweep_names", "lr_sensitivity", "divergence_map", "predict_attn_logits"]

_FINISHED = ("completed", "diverged")


@dataclass
class SweepTable:
    """The finished trials of one sweep and their per-(intervention, size) measures.

    Attribute names match :class:`seismo.proxy.sweep.SweepSummary`, so the figures of
    :mod:`seismo.report.sweep_plots` accept either.
    """

    name: str
    rows: list[dict]  #: one per trial: the run's meta plus ``run_id`` and ``status``
    sensitivity: dict[tuple[str, str], float]  #: (intervention, size) -> LR sensitivity
    best_lr: dict[tuple[str, str], float]  #: (intervention, size) -> LR with the lowest capped loss
    divergence: dict[tuple[str, str], float]  #: (intervention, size) -> fraction of diverged trials
    n_params: dict[str, float]  #: size -> non-embedding parameters


def sweep_names(store: RunStore) -> list[str]:
    """Names of the sweeps that have finished trials in ``store``, sorted."""
    return sorted({str(r.meta["sweep"]) for r in store.runs() if r.meta.get("sweep") and r.status in _FINISHED})


def load_sweep(store: RunStore, name: str) -> SweepTable:
    """The finished trials of sweep ``name`` and their measures; seeds are averaged per LR."""
    rows = [dict(r.meta, run_id=r.run_id, status=r.status) for r in store.runs()
            if r.meta.get("sweep") == name and r.status in _FINISHED]
    groups: dict[tuple[str, str], dict[float, list[dict]]] = {}
    n_params: dict[str, float] = {}
    for r in rows:
        groups.setdefault((str(r["intervention"]), str(r["size"])), {}).setdefault(float(r["lr"]), []).append(r)
        if r.get("n_params"):
            n_params[str(r["size"])] = float(r["n_params"])
    sens, best, div = {}, {}, {}
    for key, by_lr in groups.items():
        lrs = sorted(by_lr)
        capped = [float(np.mean([capped_final_loss(x) for x in by_lr[lr]])) for lr in lrs]
        init = float(np.nanmedian([x["init_loss"] for lr in lrs for x in by_lr[lr]]))
        sens[key] = lr_sensitivity(capped, init)
        best[key] = lrs[int(np.argmin(capped))]
        div[key] = float(np.mean([x["status"] == "diverged" for lr in lrs for x in by_lr[lr]]))
    return SweepTable(name, rows, sens, best, div, n_params)


def divergence_map(table: SweepTable, intervention: str) -> tuple[list[str], list[float], np.ndarray]:
    """``(sizes, lrs, fraction diverged[size, lr])`` for one intervention; NaN where no trial ran."""
    rows = [r for r in table.rows if r["intervention"] == intervention]
    sizes = sorted({str(r["size"]) for r in rows}, key=lambda s: table.n_params.get(s, 0))
    lrs = sorted({float(r["lr"]) for r in rows})
    grid = np.full((len(sizes), len(lrs)), np.nan)
    for i, size in enumerate(sizes):
        for j, lr in enumerate(lrs):
            st = [r["status"] for r in rows if str(r["size"]) == size and float(r["lr"]) == lr]
            if st:
                grid[i, j] = float(np.mean([s == "diverged" for s in st]))
    return sizes, lrs, grid


def predict_attn_logits(table: SweepTable, target_params: float, intervention: str) -> dict[float, float]:
    """Per LR, the max attention logit extrapolated to ``target_params`` from a power-law fit over
    the smaller sizes (Wortsman et al. 2023 §3.1.2: instability is predictable from small runs).
    LRs with fewer than two usable sizes are left out."""
    out: dict[float, float] = {}
    rows = [r for r in table.rows if r["intervention"] == intervention and r.get("n_params")
            and float(r["n_params"]) < target_params and math.isfinite(r.get("max_attn_logit", math.nan))]
    for lr in sorted({float(r["lr"]) for r in rows}):
        pts = [(float(r["n_params"]), float(r["max_attn_logit"])) for r in rows if float(r["lr"]) == lr]
        if len({p[0] for p in pts if p[0] > 0 and p[1] > 0}) < 2:
            continue
        fit = fit_power_law([p[0] for p in pts], [p[1] for p in pts])
        out[lr] = float(fit(target_params))
    return out
