"""Matplotlib figures without pyplot: nothing here touches the user's backend or global state.

A figure is a plain :class:`matplotlib.figure.Figure` with an Agg canvas attached; ``savefig``
picks the renderer from the file format (Agg for PNG, the SVG backend for SVG) for that one call.
``matplotlib.use`` is never called and ``matplotlib.pyplot`` is never imported, so a user's
interactive backend and open pyplot figures are left alone. Matplotlib is the ``plot`` extra and
is imported on first use.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from seismo._io import atomic_write

__all__ = ["MissingExtra", "new_figure", "save_figure", "figure_svg", "mpl_text", "max_over_prefix", "module_matrix"]


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message says which extra to install."""


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] = (6.0, 4.0), layout: str | None = "constrained",
               **subplot_kw: Any):
    """A ``Figure`` with an Agg canvas and a ``squeeze=False`` grid of axes: ``(fig, axes)``.

    ``layout`` is matplotlib's; the default, ``"constrained"``, fits labels, legends and colorbars
    while the figure is drawn (no extra drawing pass, unlike ``tight_layout``)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtra("plots need matplotlib: pip install 'seismo[plot]'") from None
    fig = Figure(figsize=figsize, layout=layout)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)
    return fig, axes


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` atomically; the format comes from the suffix (``.png``, ``.svg``...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lstrip(".").lower() or "png"
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi))


def figure_svg(fig, *, dpi: int = 90) -> str:
    """The figure as an ``<svg>`` element to inline in HTML (no XML prolog, text kept as text).

    Raster parts (heatmaps drawn with ``imshow``) are embedded as ``data:`` PNG images.
    """
    from matplotlib import rc_context

    buf = io.StringIO()
    with rc_context({"svg.fonttype": "none"}):  # text as <text>, not glyph paths: 3-5x smaller
        fig.savefig(buf, format="svg", dpi=dpi, bbox_inches="tight", pad_inches=0.05)
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    return re.sub(r"<metadata>.*?</metadata>\s*", "", text, count=1, flags=re.S)  # RDF boilerplate, no drawing


def mpl_text(text: object) -> str:
    """A user string (run or module name) as literal matplotlib text: ``$`` would start mathtext
    (and a stray one fails the whole drawing), a leading ``_`` would hide a legend entry."""
    text = str(text).replace("$", r"\$")
    return "\u200b" + text if text.startswith("_") else text


def max_over_prefix(history: Mapping[str, tuple[np.ndarray, np.ndarray]], prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise max over every series whose name starts with ``prefix``, aligned by step.

    Non-finite values are ignored; a step where no series is finite is left out.
    """
    merged: dict[int, float] = {}
    for name, (steps, vals) in history.items():
        if name.startswith(prefix):
            for s, v in zip(np.asarray(steps).tolist(), np.asarray(vals, dtype=np.float64).tolist()):
                if np.isfinite(v):
                    merged[s] = max(merged.get(s, -np.inf), v)
    if not merged:
        return np.array([], dtype=np.int64), np.array([], dtype=np.float64)
    steps = np.array(sorted(merged), dtype=np.int64)
    return steps, np.array([merged[s] for s in steps.tolist()], dtype=np.float64)


def module_matrix(history: Mapping[str, tuple[np.ndarray, np.ndarray]], prefix: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Per-module series under ``prefix`` as a matrix: ``(modules, steps, values[module, step])``.

    ``modules`` are the name suffixes after ``prefix`` in name order; ``steps`` is the union of
    their steps; a module without a value at a step has NaN there.
    """
    names = sorted(n for n in history if n.startswith(prefix) and len(n) > len(prefix))
    if not names:
        return [], np.array([], dtype=np.int64), np.zeros((0, 0))
    steps = np.unique(np.concatenate([np.asarray(history[n][0], dtype=np.int64) for n in names]))
    matrix = np.full((len(names), len(steps)), np.nan)
    for i, n in enumerate(names):
        s, v = history[n]
        matrix[i, np.searchsorted(steps, np.asarray(s, dtype=np.int64))] = np.asarray(v, dtype=np.float64)
    return [n[len(prefix):] for n in names], steps, matrix
