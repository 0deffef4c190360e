"""The measures of Wortsman et al. 2023 (arXiv 2309.14322): LR sensitivity (over the whole grid and
near the best LR), optimal LR, divergence rate, seed spreads, and the size-scaling fits used to
predict instability before it happens, with an explicit definition of an unstable trial.

``lr_sensitivity`` and ``divergence_rate`` live in :mod:`seismo._stats` (the report layer uses them
too) and are re-exported here. The size prediction is :func:`scaling_prediction` (``seismo sweep
--predict`` and bench/check_reproductions.py both call it): fitted on the seed means of >= 3 sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from seismo._stats import PowerLaw, divergence_rate, fit_power_law, lr_sensitivity

__all__ = [
    "lr_sensitivity", "lr_sensitivity_near_best", "optimal_lr", "divergence_rate", "PowerLaw", "fit_power_law", "Spread",
    "seed_spread", "capped_final_loss", "sensitivity_over_seeds", "cell_spread", "unstable_fraction", "ScalingPoint",
    "scaling_prediction", "first_step_at_or_above", "sharpness_ratio", "trial_measures", "UNSTABLE_MARGIN",
]

#: An LR is *unstable* for a trial when the trial diverged, or when the LR is above the trial's best
#: LR and its final loss ends more than this many nats above the best loss over the grid. (Under-
#: training at a too-small LR is not instability, so the low side of the grid never counts.)
UNSTABLE_MARGIN = 0.1


def _capped(losses: Sequence[float], init_loss: float) -> np.ndarray:
    a = np.asarray(losses, dtype=np.float64)
    a = np.where(np.isfinite(a), a, init_loss)  # NaN / inf (diverged) count as the initial loss
    return np.minimum(a, init_loss)


def optimal_lr(lrs: Sequence[float], losses: Sequence[float], init_loss: float = math.inf) -> float:
    """The LR with the lowest (capped) final loss."""
    c = _capped(losses, init_loss if math.isfinite(init_loss) else np.inf)
    return float(np.asarray(lrs)[int(np.argmin(c))])


def lr_sensitivity_near_best(lrs: Sequence[float], losses: Sequence[float], init_loss: float, within: float = 10.0) -> float:
    """LR sensitivity (Wortsman et al. 2023 §2, arXiv 2309.14322) over the LRs within a factor
    ``within`` of the best LR only: ``best / within <= lr <= best * within``.

    Over the whole grid, the smallest LRs of a short run are under-trained and their high loss
    dominates the measure (at 300 steps, LR 3e-4 alone gave 0.158 of a 0.388 sensitivity); this
    variant measures how fast the loss degrades around the optimum, which is what an intervention
    that stabilises training at high LR can change."""
    if len(lrs) != len(losses):
        raise ValueError(f"lrs and losses must have the same length, got {len(lrs)} and {len(losses)}")
    if not within >= 1.0:
        raise ValueError(f"within must be >= 1, got {within}")
    a, c = np.asarray(lrs, dtype=np.float64), _capped(losses, init_loss)
    best = a[int(np.argmin(c))]
    keep = (a >= best / within * (1 - 1e-9)) & (a <= best * within * (1 + 1e-9))
    return lr_sensitivity(c[keep], init_loss)


@dataclass(frozen=True)
class Spread:
    """Mean and spread of one quantity over seeds: sample standard deviation (ddof 1; 0 for one
    seed), smallest and largest value, and the number of seeds."""

    mean: float
    std: float
    lo: float
    hi: float
    n: int


def seed_spread(values: Iterable[float]) -> Spread:
    """:class:`Spread` of ``values`` (one per seed). Non-finite values propagate into mean and std."""
    v = np.asarray(list(values), dtype=np.float64)
    if not len(v):
        raise ValueError("seed_spread needs at least one value")
    std = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    return Spread(float(np.mean(v)), std, float(np.min(v)), float(np.max(v)), int(len(v)))


def capped_final_loss(row: dict) -> float:
    """A trial's final validation loss for LR-sensitivity purposes: its initial loss if it did not
    complete (diverged or failed) or ended above it (Wortsman et al. 2023 §2)."""
    l0 = float(row["init_loss"])
    loss = float(row.get("final_val_loss", math.nan)) if row.get("status") == "completed" else math.nan
    return float(_capped([loss], l0)[0])


def _by(rows: Iterable[dict], *keys: str) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(float(r[k]) if k == "lr" else r[k] for k in keys), []).append(r)
    return out


def sensitivity_over_seeds(rows: Iterable[dict], near_best: bool = False, within: float = 10.0) -> dict[tuple[str, str], Spread]:
    """Per ``(intervention, size)``: the LR sensitivity of each seed's own loss-vs-LR curve, and
    their :class:`Spread` over seeds. ``near_best`` uses :func:`lr_sensitivity_near_best`.

    ``rows`` are sweep trials (``intervention``, ``size``, ``lr``, ``seed``, ``status``,
    ``final_val_loss``, ``init_loss``); a seed counts only if it has the cell's full LR grid."""
    out = {}
    for (iv, size), cell in _by(rows, "intervention", "size").items():
        grid = sorted({float(r["lr"]) for r in cell})
        values = []
        for _, trials in sorted(_by(cell, "seed").items()):
            by_lr = {float(r["lr"]): r for r in trials}
            if sorted(by_lr) != grid:
                continue
            losses = [capped_final_loss(by_lr[lr]) for lr in grid]
            l0 = float(np.median([float(by_lr[lr]["init_loss"]) for lr in grid]))
            values.append(lr_sensitivity_near_best(grid, losses, l0, within) if near_best else lr_sensitivity(losses, l0))
        if values:
            out[(iv, size)] = seed_spread(values)
    return out


def cell_spread(rows: Iterable[dict], value: str = "final_val_loss") -> dict[tuple[str, str, float], Spread]:
    """Per ``(intervention, size, lr)``: the :class:`Spread` over seeds of ``value`` (a trial field;
    ``"capped_loss"`` means :func:`capped_final_loss`)."""
    out = {}
    for key, trials in _by(rows, "intervention", "size", "lr").items():
        vals = [capped_final_loss(r) if value == "capped_loss" else float(r.get(value, math.nan)) for r in trials]
        out[key] = seed_spread(vals)
    return out


def unstable_fraction(rows: Iterable[dict], margin: float = UNSTABLE_MARGIN) -> dict[tuple[str, str, float], float]:
    """Per ``(intervention, size, lr)``: the fraction of seeds for which that LR is unstable
    (:data:`UNSTABLE_MARGIN`): the trial diverged, or its LR is above the best LR of the same seed's
    grid and its final loss is more than ``margin`` nats above that seed's best loss."""
    out: dict[tuple[str, str, float], list[bool]] = {}
    for (iv, size, _seed), trials in _by(rows, "intervention", "size", "seed").items():
        lrs = [float(r["lr"]) for r in trials]
        losses = [capped_final_loss(r) for r in trials]
        i_best = int(np.argmin(losses))
        for r, lr, loss in zip(trials, lrs, losses):
            bad = r.get("status") == "diverged" or (lr > lrs[i_best] and loss > losses[i_best] + margin)
            out.setdefault((iv, size, lr), []).append(bool(bad))
    return {k: float(np.mean(v)) for k, v in out.items()}


@dataclass(frozen=True)
class ScalingPoint:
    """One LR of :func:`scaling_prediction`."""

    lr: float
    predicted_logit: float  #: max attention logit at the target size, from the power-law fit
    predicted_unstable: bool  #: predicted_logit >= the threshold
    r2: float | None  #: R^2 of the fit in log-log space; None with fewer than 3 sizes (1 by construction)
    exponent: float  #: the fitted power of the size
    n_sizes: int
    observed_logit: float  #: seed mean at the target size (NaN if not run)
    observed_unstable: float  #: fraction of the target size's seeds for which this LR is unstable (NaN if not run)


def scaling_prediction(rows: Sequence[dict], intervention: str, target: str | float, threshold: float,
                       fit_sizes: Sequence[str] | None = None, min_sizes: int = 3, margin: float = UNSTABLE_MARGIN) -> list[ScalingPoint]:
    """Predict a held-out size from smaller ones (Wortsman et al. 2023 §3.1.2, arXiv 2309.14322).

    Per LR, the seed-mean max attention logit of the ``fit_sizes`` (default: every size smaller
    than ``target``) is fitted by a power law in the trials' ``n_params`` and extrapolated to
    ``target``; the LR is predicted unstable if the prediction reaches ``threshold``. The
    prediction is checked against what the target size did: the fraction of its seeds for which
    the LR is unstable by the loss (:func:`unstable_fraction`: diverged, or more than ``margin``
    nats above the best), not by the logit alone. Needs ``min_sizes`` (>= 3) fitted sizes: with
    two, R^2 = 1 whatever the data.

    ``target`` is a size name of ``rows`` or a parameter count (a size that was not run: its
    observed fields are NaN, unless a size of ``rows`` has exactly that count). LRs with fewer than
    ``min_sizes`` positive finite seed means are left out (a seed's non-finite logit makes its
    cell's mean non-finite)."""
    if min_sizes < 3:
        raise ValueError(f"min_sizes must be >= 3 (a 2-point fit has R^2 = 1 by construction), got {min_sizes}")
    mine = [r for r in rows if r["intervention"] == intervention]
    n_params = {r["size"]: float(r["n_params"]) for r in mine if r.get("n_params")}
    if isinstance(target, str):
        if target not in n_params:
            raise ValueError(f"target size {target!r} has no trial with n_params for {intervention!r}")
        n_target = n_params[target]
    else:
        n_target = float(target)
        if not (math.isfinite(n_target) and n_target > 0):
            raise ValueError(f"a target parameter count must be positive and finite, got {target!r}")
        target = next((s for s, n in n_params.items() if n == n_target), "")
    fit_sizes = list(fit_sizes) if fit_sizes is not None else sorted((s for s in n_params if n_params[s] < n_target), key=n_params.get)
    if len(fit_sizes) < min_sizes:
        raise ValueError(f"need >= {min_sizes} sizes to fit, got {len(fit_sizes)} ({', '.join(fit_sizes) or 'none'}): "
                         "a power law through 2 points has R^2 = 1 by construction")
    logit = {k: v.mean for k, v in cell_spread(mine, "max_attn_logit").items()}
    unstable = unstable_fraction(mine, margin)
    out = []
    for lr in sorted({float(r["lr"]) for r in mine}):
        pts = [(n_params[s], logit[(intervention, s, lr)]) for s in fit_sizes if (intervention, s, lr) in logit]
        pts = [(x, y) for x, y in pts if math.isfinite(y) and y > 0]
        if len(pts) < min_sizes:
            continue
        fit = fit_power_law([p[0] for p in pts], [p[1] for p in pts])
        pred = float(fit(n_target))
        out.append(ScalingPoint(lr, pred, pred >= threshold, fit.r2 if fit.n >= 3 else None, fit.exponent, fit.n,
                                logit.get((intervention, target, lr), math.nan), unstable.get((intervention, target, lr), math.nan)))
    return out


def first_step_at_or_above(steps: Sequence[int], values: Sequence[float], level: float) -> int | None:
    """The first step whose value is >= ``level`` (None if never): e.g. when test accuracy reaches 95%."""
    for s, v in zip(steps, values):
        if math.isfinite(v) and v >= level:
            return int(s)
    return None


def sharpness_ratio(eig: Sequence[float], threshold: Sequence[float], tail: float = 0.5) -> tuple[float, float]:
    """(median, max) of top Hessian eigenvalue / stability threshold over the last ``tail`` of the
    probes. At the edge of stability (Cohen et al. 2021, arXiv 2103.00065) the median sits near 1:
    full-batch GD raises sharpness until it reaches 2/lr and then stays there."""
    e, t = np.asarray(eig, dtype=np.float64), np.asarray(threshold, dtype=np.float64)
    r = e / t
    r = r[np.isfinite(r)]
    if not len(r):
        return math.nan, math.nan
    last = r[int(len(r) * (1.0 - tail)):] if len(r) > 1 else r
    return float(np.median(last)), float(r.max())


def trial_measures(history: dict, grok_level: float = 0.95) -> dict[str, float | int | None]:
    """Per-trial measures beyond the loss, from a run's recorded signals (only those recorded):

    * ``final_val_acc`` and ``grok_step`` (first step with validation accuracy >= ``grok_level``),
      for classification runs (Prieto et al. 2025);
    * ``max_softmax_collapse`` (largest fraction of collapsed softmax rows, Prieto et al. 2025);
    * ``sharpness_ratio`` / ``max_sharpness_ratio``: top Hessian eigenvalue over its stability
      threshold (2/lr for GD), median over the second half of the run and maximum (Cohen 2021).
    """
    out: dict[str, float | int | None] = {}
    if "val/acc" in history:
        s, v = history["val/acc"]
        if len(v):
            out["final_val_acc"] = float(v[-1])
            out["grok_step"] = first_step_at_or_above(s, v, grok_level)
    if "train/acc" in history and len(history["train/acc"][1]):
        out["final_train_acc"] = float(history["train/acc"][1][-1])
    if "logits/softmax_collapse" in history:
        v = np.asarray(history["logits/softmax_collapse"][1], dtype=np.float64)
        out["max_softmax_collapse"] = float(np.nanmax(v)) if np.isfinite(v).any() else math.nan
    if "hessian/max_eig" in history and "hessian/threshold" in history:
        (s1, e), (s2, t) = history["hessian/max_eig"], history["hessian/threshold"]
        common, i1, i2 = np.intersect1d(s1, s2, return_indices=True)  # steps with both values
        if len(common):
            out["sharpness_ratio"], out["max_sharpness_ratio"] = sharpness_ratio(np.asarray(e)[i1], np.asarray(t)[i2])
    return out
