"""Sweep figures (the ``plot`` extra): final loss vs LR per size and intervention (Wortsman et al.
2023, arXiv 2309.14322, figure 1 layout), LR sensitivity vs size, max attention logit vs size with
its power-law fit, and per-trial curves for full-batch sweeps.

``summary`` is anything with the attributes of :class:`seismo.proxy.sweep.SweepSummary` (``rows``,
``sensitivity``, ``n_params``), e.g. :class:`seismo.report.sweep_report.SweepTable`. Each figure has
a builder (``*_figure``, returns a matplotlib ``Figure`` or None) and :func:`plot_sweep` /
:func:`plot_trial_curves` write them as PNG and SVG, atomically, without pyplot.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from seismo._stats import fit_power_law
from seismo.report.figures import mpl_text, new_figure, save_figure
from seismo.store import RunStore

__all__ = [
    "plot_sweep", "plot_trial_curves", "loss_vs_lr_figure", "sensitivity_vs_size_figure", "attn_logit_vs_size_figure",
    "capped_final_loss",
]


def _finish(fig, base: Path) -> list[Path]:
    """Save as PNG and SVG; returns the paths."""
    return [save_figure(fig, base.with_suffix("." + ext)) for ext in ("png", "svg")]


def capped_final_loss(row: dict) -> float:
    """A trial's final validation loss, capped at its initial loss; a diverged trial counts as
    its initial loss (Wortsman et al. 2023 §2)."""
    loss = row["final_val_loss"] if row["status"] == "completed" else math.nan
    return min(loss, row["init_loss"]) if np.isfinite(loss) else row["init_loss"]


def _sizes(summary) -> list[str]:
    return sorted({r["size"] for r in summary.rows}, key=lambda s: summary.n_params.get(s, 0))


def loss_vs_lr_figure(summary):
    """Final loss (capped, see :func:`capped_final_loss`) vs LR: one panel per intervention, one
    line per size, in LR order."""
    rows = summary.rows
    interventions = sorted({r["intervention"] for r in rows})
    fig, axes = new_figure(1, len(interventions), figsize=(4.5 * len(interventions), 3.8), sharey=True)
    for ax, iv in zip(axes[0], interventions):
        for size in _sizes(summary):
            pts = sorted((r["lr"], capped_final_loss(r)) for r in rows if r["intervention"] == iv and r["size"] == size)
            if not pts:
                continue
            n = summary.n_params.get(size)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mpl_text(f"{size} ({n:.2g} params)" if n else size))
        ax.set_xscale("log")
        ax.set_title(mpl_text(iv))
        ax.set_xlabel("learning rate")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final val loss (capped at init)")
    axes[0][-1].legend(fontsize=8)
    return fig


def sensitivity_vs_size_figure(summary):
    """LR sensitivity vs non-embedding parameters, one line per intervention."""
    sizes = _sizes(summary)
    fig, axes = new_figure(figsize=(5, 3.8))
    ax = axes[0][0]
    for iv in sorted({r["intervention"] for r in summary.rows}):
        have = [s for s in sizes if (iv, s) in summary.sensitivity]
        ax.plot([summary.n_params.get(s, i + 1) for i, s in enumerate(have)], [summary.sensitivity[(iv, s)] for s in have],
                marker="o", label=mpl_text(iv))
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("LR sensitivity")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def attn_logit_vs_size_figure(summary, lr: float | None = None):
    """Max attention logit vs size at one LR (default: the largest), with a power-law fit per
    intervention (Wortsman et al. 2023 §3.1.2). None when no trial recorded attention logits."""
    rows = summary.rows
    lr = lr if lr is not None else max(r["lr"] for r in rows)
    if not any(r["lr"] == lr and np.isfinite(r.get("max_attn_logit", np.nan)) for r in rows):
        return None  # no attention (e.g. full-batch MLP sweeps): nothing to plot
    fig, axes = new_figure(figsize=(5, 3.8))
    ax = axes[0][0]
    for iv in sorted({r["intervention"] for r in rows}):
        pts = sorted((summary.n_params.get(r["size"], 0), r["max_attn_logit"]) for r in rows
                     if r["intervention"] == iv and r["lr"] == lr and np.isfinite(r.get("max_attn_logit", np.nan)))
        if not pts:
            continue
        x, y = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
        line, = ax.plot(x, y, "o", label=mpl_text(iv))
        if np.sum((x > 0) & (y > 0)) >= 2:  # a power-law fit needs two positive points
            fit = fit_power_law(x, y)
            grid = np.geomspace(x[x > 0].min(), x.max() * 10, 50)
            ax.plot(grid, fit(grid), "--", color=line.get_color(), label=mpl_text(f"{iv} fit: N^{fit.exponent:.2f}"))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel(f"max attention logit (lr {lr:g})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def plot_sweep(summary, out_dir: str | os.PathLike, fit_lr: float | None = None) -> list[Path]:
    """Write the three sweep figures as PNG and SVG under ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = _finish(loss_vs_lr_figure(summary), out_dir / "loss_vs_lr")
    paths += _finish(sensitivity_vs_size_figure(summary), out_dir / "lr_sensitivity_vs_size")
    fig = attn_logit_vs_size_figure(summary, fit_lr)
    if fig is not None:
        paths += _finish(fig, out_dir / "attn_logit_vs_size")
    return paths


def _label(r: dict) -> str:
    return mpl_text(f"{r['intervention']} {r['size']} lr {r['lr']:g}")


def accuracy_figure(store: RunStore, rows: list[dict]):
    """Train/test accuracy and the Softmax Collapse fraction per trial (grokking, Prieto et al.
    2025, arXiv 2501.04697); None when no trial recorded ``val/acc``."""
    acc_rows = [r for r in rows if "final_val_acc" in r]
    if not acc_rows:
        return None
    fig, axes = new_figure(1, 2, figsize=(11, 4))
    ax1, ax2 = axes[0]
    for r in acc_rows:
        run_id = int(r["run_id"])
        s, v = store.series(run_id, "val/acc")
        line, = ax1.plot(s, v, label=_label(r) + " (test)")
        s, v = store.series(run_id, "train/acc")
        if len(s):
            ax1.plot(s, v, ":", color=line.get_color())
        s, v = store.series(run_id, "logits/softmax_collapse")
        if len(s):
            ax2.plot(s, v, color=line.get_color(), label=_label(r))
    ax1.set_xlabel("step")
    ax1.set_ylabel("accuracy (solid: test, dotted: train)")
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    ax2.set_xlabel("step")
    ax2.set_ylabel("fraction of rows in Softmax Collapse")
    ax2.grid(alpha=0.3)
    return fig


def sharpness_trials_figure(store: RunStore, rows: list[dict]):
    """Top Hessian eigenvalue per trial with its 2/lr threshold dashed (edge of stability, Cohen
    et al. 2021, arXiv 2103.00065); None when no trial recorded a sharpness ratio."""
    eig_rows = [r for r in rows if "sharpness_ratio" in r]
    if not eig_rows:
        return None
    fig, axes = new_figure(figsize=(6.5, 4.2))
    ax = axes[0][0]
    for r in eig_rows:
        s, v = store.series(int(r["run_id"]), "hessian/max_eig")
        line, = ax.plot(s, v, label=_label(r))
        ax.axhline(2.0 / r["lr"], ls="--", lw=0.8, color=line.get_color())
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("top Hessian eigenvalue (dashed: 2/lr)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def plot_trial_curves(store_path: str | os.PathLike, rows: list[dict], out_dir: str | os.PathLike) -> list[Path]:
    """Write ``accuracy_vs_step`` (:func:`accuracy_figure`) and ``sharpness_vs_step``
    (:func:`sharpness_trials_figure`) when the trials recorded those signals; returns the paths."""
    out_dir = Path(out_dir)
    rows = sorted(rows, key=lambda r: (r["intervention"], r.get("n_params") or 0, r["lr"], r.get("seed", 0)))
    paths: list[Path] = []
    with RunStore(store_path) as store:
        for fig, base in ((accuracy_figure(store, rows), "accuracy_vs_step"), (sharpness_trials_figure(store, rows), "sharpness_vs_step")):
            if fig is not None:
                out_dir.mkdir(parents=True, exist_ok=True)
                paths += _finish(fig, out_dir / base)
    return paths
