"""Sweep figures (the ``plot`` extra): final loss vs LR per size and intervention (Wortsman et al.
2023 figure 1 layout), LR sensitivity vs size, and max attention logit vs size with its fit."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from seismo._stats import fit_power_law
from seismo.report.plots import _pyplot
from seismo.store import RunStore

__all__ = ["plot_sweep", "plot_trial_curves"]


def _save(fig, base: Path) -> list[Path]:
    out = []
    for ext in ("png", "svg"):
        path = base.with_suffix("." + ext)
        tmp = path.with_name(f".{path.stem}.tmp.{ext}")
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
        out.append(path)
    return out


def _finish(plt, fig, base: Path) -> list[Path]:
    """Lay out, save as PNG and SVG, close; returns the paths."""
    fig.tight_layout()
    paths = _save(fig, base)
    plt.close(fig)
    return paths


def plot_sweep(summary, out_dir: str | os.PathLike, fit_lr: float | None = None) -> list[Path]:
    """Write the three figures for a :class:`~seismo.proxy.sweep.SweepSummary`; returns the paths."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summary.rows
    interventions = sorted({r["intervention"] for r in rows})
    sizes = sorted({r["size"] for r in rows}, key=lambda s: summary.n_params.get(s, 0))
    paths: list[Path] = []

    # 1. final loss vs LR, one panel per intervention, one curve per size
    fig, axes = plt.subplots(1, len(interventions), figsize=(4.5 * len(interventions), 3.8), sharey=True, squeeze=False)
    for ax, iv in zip(axes[0], interventions):
        for size in sizes:
            pts = sorted((r["lr"], r["final_val_loss"] if r["status"] == "completed" else math.nan, r["init_loss"])
                         for r in rows if r["intervention"] == iv and r["size"] == size)
            if not pts:
                continue
            lrs = np.array([p[0] for p in pts])
            loss = np.array([min(p[1], p[2]) if np.isfinite(p[1]) else p[2] for p in pts])
            n = summary.n_params.get(size)
            ax.plot(lrs, loss, marker="o", label=f"{size} ({n:.2g} params)" if n else size)
        ax.set_xscale("log")
        ax.set_title(iv)
        ax.set_xlabel("learning rate")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final val loss (capped at init)")
    axes[0][-1].legend(fontsize=8)
    paths += _finish(plt, fig, out_dir / "loss_vs_lr")

    # 2. LR sensitivity vs size
    fig, ax = plt.subplots(figsize=(5, 3.8))
    for iv in interventions:
        xs = [summary.n_params.get(s, i + 1) for i, s in enumerate(sizes) if (iv, s) in summary.sensitivity]
        ys = [summary.sensitivity[(iv, s)] for s in sizes if (iv, s) in summary.sensitivity]
        ax.plot(xs, ys, marker="o", label=iv)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("LR sensitivity")
    ax.legend()
    ax.grid(alpha=0.3)
    paths += _finish(plt, fig, out_dir / "lr_sensitivity_vs_size")

    # 3. max attention logit vs size at one LR, with the power-law fit

    lr = fit_lr if fit_lr is not None else max(r["lr"] for r in rows)
    if not any(r["lr"] == lr and np.isfinite(r.get("max_attn_logit", np.nan)) for r in rows):
        return paths  # no attention (e.g. full-batch MLP sweeps): nothing to plot
    fig, ax = plt.subplots(figsize=(5, 3.8))
    for iv in interventions:
        pts = sorted((summary.n_params.get(r["size"], 0), r["max_attn_logit"]) for r in rows
                     if r["intervention"] == iv and r["lr"] == lr and np.isfinite(r.get("max_attn_logit", np.nan)))
        if not pts:
            continue
        x, y = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
        line, = ax.plot(x, y, "o", label=iv)
        try:
            fit = fit_power_law(x, y)
            grid = np.geomspace(x.min(), x.max() * 10, 50)
            ax.plot(grid, fit(grid), "--", color=line.get_color(), label=f"{iv} fit: N^{fit.exponent:.2f}")
        except ValueError:
            pass
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel(f"max attention logit (lr {lr:g})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    paths += _finish(plt, fig, out_dir / "attn_logit_vs_size")
    return paths


def plot_trial_curves(store_path: str | os.PathLike, rows: list[dict], out_dir: str | os.PathLike) -> list[Path]:
    """Curves over training for sweeps whose trials record more than a loss:

    * ``accuracy_vs_step``: train and test accuracy and the Softmax Collapse fraction per trial
      (grokking, Prieto et al. 2025), when the trials recorded ``val/acc``;
    * ``sharpness_vs_step``: top Hessian eigenvalue per trial with its 2/lr threshold dashed (edge of
      stability, Cohen et al. 2021), when they recorded ``hessian/max_eig``.

    Returns the written paths (none when no trial has such signals)."""

    plt = _pyplot()
    out_dir = Path(out_dir)
    rows = sorted(rows, key=lambda r: (r["intervention"], r.get("n_params") or 0, r["lr"], r.get("seed", 0)))
    paths: list[Path] = []
    with RunStore(store_path) as store:
        def series(r, name):
            return store.series(int(r["run_id"]), name)

        acc_rows = [r for r in rows if "final_val_acc" in r]
        if acc_rows:
            out_dir.mkdir(parents=True, exist_ok=True)
            fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
            colors = {}
            for r in acc_rows:
                label = f"{r['intervention']} {r['size']} lr {r['lr']:g}"
                s, v = series(r, "val/acc")
                line, = ax1.plot(s, v, label=label + " (test)")
                colors[label] = line.get_color()
                s, v = series(r, "train/acc")
                if len(s):
                    ax1.plot(s, v, ":", color=line.get_color())
                s, v = series(r, "logits/softmax_collapse")
                if len(s):
                    ax2.plot(s, v, color=line.get_color(), label=label)
            ax1.set_xlabel("step")
            ax1.set_ylabel("accuracy (solid: test, dotted: train)")
            ax1.legend(fontsize=7)
            ax1.grid(alpha=0.3)
            ax2.set_xlabel("step")
            ax2.set_ylabel("fraction of rows in Softmax Collapse")
            ax2.grid(alpha=0.3)
            paths += _finish(plt, fig, out_dir / "accuracy_vs_step")

        eig_rows = [r for r in rows if "sharpness_ratio" in r]
        if eig_rows:
            out_dir.mkdir(parents=True, exist_ok=True)
            fig, ax = plt.subplots(figsize=(6.5, 4.2))
            for r in eig_rows:
                s, v = series(r, "hessian/max_eig")
                line, = ax.plot(s, v, label=f"{r['intervention']} {r['size']} lr {r['lr']:g}")
                ax.axhline(2.0 / r["lr"], ls="--", lw=0.8, color=line.get_color())
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_ylabel("top Hessian eigenvalue (dashed: 2/lr)")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
            paths += _finish(plt, fig, out_dir / "sharpness_vs_step")
    return paths
