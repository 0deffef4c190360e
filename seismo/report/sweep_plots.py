"""Sweep figures (the ``plot`` extra): final loss vs LR per size and intervention (Wortsman et al.
2023 figure 1 layout), LR sensitivity vs size, and max attention logit vs size with its fit."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from seismo.report.plots import _pyplot

__all__ = ["plot_sweep"]


def _save(fig, base: Path) -> list[Path]:
    out = []
    for ext in ("png", "svg"):
        path = base.with_suffix("." + ext)
        tmp = path.with_name(f".{path.stem}.tmp.{ext}")
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
        out.append(path)
    return out


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
    fig.tight_layout()
    paths += _save(fig, out_dir / "loss_vs_lr")
    plt.close(fig)

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
    fig.tight_layout()
    paths += _save(fig, out_dir / "lr_sensitivity_vs_size")
    plt.close(fig)

    # 3. max attention logit vs size at one LR, with the power-law fit
    from seismo.proxy.measures import fit_power_law

    lr = fit_lr if fit_lr is not None else max(r["lr"] for r in rows)
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
    fig.tight_layout()
    paths += _save(fig, out_dir / "attn_logit_vs_size")
    plt.close(fig)
    return paths
