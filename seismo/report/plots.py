"""The demo's comparison figure: training loss, max attention logit and log Z for several runs.

Matplotlib (the ``plot`` extra) is used without pyplot: see :mod:`seismo.report.figures`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from seismo.report.figures import MissingExtra, max_over_prefix, mpl_text, new_figure, save_figure

__all__ = ["plot_runs", "runs_figure", "MissingExtra", "RUN_PANELS"]

History = Mapping[str, tuple[np.ndarray, np.ndarray]]

#: (signal name or prefix, y label, log scale): a prefix ending in "/" is the max over its modules.
RUN_PANELS = (
    ("loss", "training loss", False),
    ("attn/logit_max/", "max attention logit", True),
    ("logits/logz_mean", "mean log Z (output)", False),
)


def _panel_series(hist: History, name: str) -> tuple[np.ndarray, np.ndarray]:
    if name in hist:
        return hist[name]
    if name.endswith("/"):
        return max_over_prefix(hist, name)
    return np.array([]), np.array([])


def runs_figure(histories: Mapping[str, History], title: str = ""):
    """One panel per :data:`RUN_PANELS` entry, one line per run (labelled with the run's key)."""
    fig, axes = new_figure(1, len(RUN_PANELS), figsize=(15, 4.2))
    for label, hist in histories.items():
        for ax, (name, _, _) in zip(axes[0], RUN_PANELS):
            steps, vals = _panel_series(hist, name)
            if len(steps):
                ax.plot(steps, vals, label=mpl_text(label), linewidth=1.2)
    for ax, (_, ylabel, logy) in zip(axes[0], RUN_PANELS):
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if logy and ax.lines:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if axes[0][0].lines:
        axes[0][0].legend()
    if title:
        fig.suptitle(title)
    return fig


def plot_runs(histories: Mapping[str, History], path: str | os.PathLike, title: str = "") -> Path:
    """Write :func:`runs_figure` to ``path`` (format from the suffix), atomically.

    ``histories`` maps a run label to its signal history (``{name: (steps, values)}``).
    """
    return save_figure(runs_figure(histories, title), path)
