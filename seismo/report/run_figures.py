"""The figures of a run report, one builder per section, several runs overlaid.

Each builder takes ``runs`` (a list of ``(label, RunData)``, see :func:`seismo.store.load_run`)
and returns a matplotlib ``Figure``, or ``None`` when no run recorded the section's signals (the
report then prints a one-line note instead). Long series are thinned for drawing by
:func:`thin`, which keeps each bucket's minimum and maximum so that spikes stay visible.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from seismo.report.figures import max_over_prefix, module_matrix, mpl_text, new_figure
from seismo.store import RunData

__all__ = [
    "thin", "loss_figure", "heatmap_figure", "logz_figure", "adam_figure", "sharpness_figure", "timeline_figure",
    "SEVERITY_MARKERS", "MAX_POINTS",
]

Runs = Sequence[tuple[str, RunData]]

#: Points drawn per line at most; longer series are thinned by :func:`thin`.
MAX_POINTS = 2000

#: Event marker per severity (matplotlib marker codes).
SEVERITY_MARKERS = {"info": "o", "warning": "v", "critical": "X"}


def thin(steps: np.ndarray, values: np.ndarray, max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points: each of ``max_points // 2`` buckets keeps its min and max."""
    steps, values = np.asarray(steps), np.asarray(values, dtype=np.float64)
    if len(steps) <= max_points:
        return steps, values
    keep: list[int] = []
    for bucket in np.array_split(np.arange(len(steps)), max_points // 2):
        chunk = values[bucket]
        if not np.isfinite(chunk).any():
            keep.append(int(bucket[0]))
            continue
        keep += sorted({int(bucket[np.nanargmin(chunk)]), int(bucket[np.nanargmax(chunk)])})
    return steps[keep], values[keep]


def _series(data: RunData, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A signal by exact name, or the max over modules for a prefix ending in '/'."""
    if name.endswith("/"):
        return max_over_prefix(data.metrics, name)
    return data.metrics.get(name, (np.array([], dtype=np.int64), np.array([])))


def _has(runs: Runs, *names: str) -> bool:
    return any(len(_series(d, n)[0]) for _, d in runs for n in names)


def _positive(values: np.ndarray) -> bool:
    finite = values[np.isfinite(values)]
    return bool(len(finite)) and bool((finite > 0).all())


def _event_markers(ax, steps: np.ndarray, values: np.ndarray, events: list[dict], color) -> None:
    """Mark each event on the curve at its step (the curve's value there, interpolated)."""
    ok = np.isfinite(values)
    if not ok.any():
        return
    for severity, marker in SEVERITY_MARKERS.items():
        at = [int(e["step"]) for e in events if e.get("step") is not None and (e.get("severity") or "warning") == severity]
        if at:
            ax.plot(at, np.interp(at, steps[ok], values[ok]), linestyle="none", marker=marker, color=color,
                    markersize=7, markeredgecolor="black", markeredgewidth=0.5, label=f"_{severity} events")


def loss_figure(runs: Runs):
    """Training loss (validation loss dashed) and global gradient norm, with the run's events
    marked on both curves (v warning, X critical, o info)."""
    if not _has(runs, "loss", "grad/norm"):
        return None
    fig, axes = new_figure(1, 2, figsize=(12, 3.6))
    ax_loss, ax_grad = axes[0]
    for i, (label, data) in enumerate(runs):
        color = f"C{i}"
        for ax, name in ((ax_loss, "loss"), (ax_grad, "grad/norm")):
            s, v = _series(data, name)
            if len(s):
                ax.plot(*thin(s, v), color=color, linewidth=1.1, label=mpl_text(label))
                _event_markers(ax, s, v, data.events, color)
        s, v = _series(data, "val/loss")
        if len(s):
            ax_loss.plot(s, v, color=color, linestyle="--", linewidth=1.0, label=mpl_text(f"{label} (val)"))
    ax_loss.set_ylabel("loss")
    ax_grad.set_ylabel("gradient norm (global, before clipping)")
    if ax_grad.lines and all(_positive(np.asarray(line.get_ydata(), dtype=np.float64)) for line in ax_grad.lines):
        ax_grad.set_yscale("log")
    for ax in (ax_loss, ax_grad):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return fig


def heatmap_figure(runs: Runs, prefix: str, what: str, log: bool = False):
    """A modules x steps heatmap of the signals under ``prefix`` (e.g. ``attn/logit_max/``), one
    panel per run, one color scale for all (log10 when ``log``). None when no run has them."""
    mats = [(label, *module_matrix(data.metrics, prefix)) for label, data in runs]
    mats = [m for m in mats if m[1]]
    if not mats:
        return None
    shown = []
    for label, modules, steps, matrix in mats:
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.log10(np.where(matrix > 0, matrix, np.nan)) if log else matrix
        shown.append((label, modules, steps, np.where(np.isfinite(z), z, np.nan)))
    finite = np.concatenate([z[np.isfinite(z)] for *_, z in shown])
    vmin, vmax = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    height = max(1.8, 0.28 * max(len(m) for _, m, _, _ in shown) + 1.2)
    fig, axes = new_figure(1, len(shown), figsize=(12 if len(shown) == 1 else 6.2 * len(shown), height))
    for ax, (label, modules, steps, z) in zip(axes[0], shown):
        first, last = int(steps[0]), int(steps[-1])
        image = ax.imshow(z, aspect="auto", interpolation="nearest", cmap="viridis", vmin=vmin, vmax=vmax,
                          extent=(first - 0.5, last + 0.5, len(modules) - 0.5, -0.5))
        ax.set_yticks(range(len(modules)))
        ax.set_yticklabels([mpl_text(m) for m in modules], fontsize=7)
        ax.set_xlabel("step")
        ax.set_title(mpl_text(label), fontsize=9)
    fig.colorbar(image, ax=list(axes[0]), label=("log10 " if log else "") + what)
    return fig


def _line_panels(runs: Runs, panels: Sequence[tuple[str, str]], figsize: tuple[float, float]):
    fig, axes = new_figure(1, len(panels), figsize=figsize)
    for ax, (name, ylabel) in zip(axes[0], panels):
        for i, (label, data) in enumerate(runs):
            s, v = _series(data, name)
            if len(s):
                ax.plot(*thin(s, v), color=f"C{i}", linewidth=1.1, label=mpl_text(label))
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center", color="gray")
    first = next((ax for ax in axes[0] if ax.lines), None)
    if first is not None:
        first.legend(fontsize=8)
    return fig


def logz_figure(runs: Runs):
    """Mean and max |log Z| of the output logits (what z-loss keeps near 0; Wortsman et al. 2023
    §3.2, arXiv 2309.14322)."""
    if not _has(runs, "logits/logz_mean", "logits/logz_absmax"):
        return None
    return _line_panels(runs, [("logits/logz_mean", "mean log Z"), ("logits/logz_absmax", "max |log Z|")], (12, 3.4))


ADAM_PANELS = (
    ("adam/update_grad_cos", "cos(Adam update, gradient)"),
    ("adam/ratio_std/", "std of m/(sqrt v + eps), max over modules"),
    ("adam/eps_dominated/", "fraction with sqrt v < eps, max over modules"),
)


def adam_figure(runs: Runs):
    """Adam's update-gradient cosine and update-ratio spread (Molybog et al. 2023, arXiv
    2304.09871) and its eps-dominated fraction (Wortsman et al. 2023 §3.5)."""
    if not _has(runs, *(name for name, _ in ADAM_PANELS)):
        return None
    return _line_panels(runs, ADAM_PANELS, (15, 3.4))


def sharpness_figure(runs: Runs):
    """Top Hessian eigenvalue (and the Adam-preconditioned one) against the stability threshold
    of the optimizer at the current LR, dashed (Cohen et al. 2021, arXiv 2103.00065; 2022, arXiv
    2207.14484)."""
    if not _has(runs, "hessian/max_eig", "hessian/max_eig_precond"):
        return None
    fig, axes = new_figure(figsize=(8, 3.6))
    ax = axes[0][0]
    for i, (label, data) in enumerate(runs):
        for name, style, what in (("hessian/max_eig", "-", "sharpness"), ("hessian/max_eig_precond", "-.", "preconditioned"),
                                  ("hessian/threshold", "--", "threshold")):
            s, v = _series(data, name)
            if len(s):
                ax.plot(s, v, style, color=f"C{i}", marker="." if len(s) < 50 else None, label=mpl_text(f"{label}: {what}"))
    if all(_positive(np.asarray(line.get_ydata(), dtype=np.float64)) for line in ax.lines):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("top Hessian eigenvalue")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def timeline_figure(runs: Runs):
    """Every event as a point: step on x, kind on y, marker by severity, color by run."""
    kinds = sorted({e["kind"] for _, d in runs for e in d.events if e.get("step") is not None})
    if not kinds:
        return None
    fig, axes = new_figure(figsize=(12, 0.35 * len(kinds) + 1.4))
    ax = axes[0][0]
    row = {k: i for i, k in enumerate(kinds)}
    for i, (label, data) in enumerate(runs):
        for severity, marker in SEVERITY_MARKERS.items():
            evs = [e for e in data.events if e.get("step") is not None and (e.get("severity") or "warning") == severity]
            if evs:
                ax.plot([int(e["step"]) for e in evs], [row[e["kind"]] + 0.12 * i for e in evs], linestyle="none",
                        marker=marker, color=f"C{i}", markersize=6, label=mpl_text(f"{label}: {severity}"))
    ax.set_yticks(range(len(kinds)))
    ax.set_yticklabels(kinds, fontsize=8)
    ax.set_ylim(len(kinds) - 0.5, -0.5)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig
