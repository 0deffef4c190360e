"""Plots (the ``plot`` extra: matplotlib, imported lazily)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

__all__ = ["plot_runs", "MissingExtra"]


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message says which extra to install."""


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingExtra("plots need matplotlib: pip install 'seismo[plot]'") from None
    return plt


def _max_over(history: Mapping[str, tuple[np.ndarray, np.ndarray]], prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise max over every series whose name starts with ``prefix`` (aligned by step)."""
    merged: dict[int, float] = {}
    for name, (steps, vals) in history.items():
        if name.startswith(prefix):
            for s, v in zip(np.asarray(steps).tolist(), np.asarray(vals).tolist()):
                if np.isfinite(v):
                    merged[s] = max(merged.get(s, -np.inf), v)
    if not merged:
        return np.array([]), np.array([])
    steps = np.array(sorted(merged))
    return steps, np.array([merged[s] for s in steps])


def plot_runs(histories: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]], path: str | os.PathLike, title: str = "") -> Path:
    """Three panels for several runs: training loss, max attention logit (log scale), mean log Z.

    ``histories`` maps a run label to its signal history (``{name: (steps, values)}``). The file
    is written atomically (temporary file, then rename).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("loss", "training loss", False), ("attn/logit_max/", "max attention logit", True), ("logits/logz_mean", "mean log Z (output)", False)]
    for label, hist in histories.items():
        for ax, (prefix, ylabel, logy) in zip(axes, panels):
            steps, vals = (hist[prefix] if prefix in hist else _max_over(hist, prefix))
            if len(steps):
                ax.plot(steps, vals, label=label, linewidth=1.2)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            if logy:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
    axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
