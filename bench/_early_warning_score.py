"""Scoring for ``bench/early_warning.py``: when a run failed, when it was first warned, and the
distribution of the lead times. Pure functions on arrays, tested in
tests/diagnose/test_early_warning_score.py against hand-built series.

* **Failure** (``failure_step``): the first step at which the loss is non-finite, or the first step
  ``t`` from which the smoothed loss (trailing mean of the last ``smooth`` finite losses, causal)
  stays more than ``margin`` nats above its best so far (the minimum of the smoothed loss over
  steps ``<= t``) for ``hold`` consecutive recorded steps; whichever comes first. A run that ends
  (non-finite loss) before ``hold`` steps have passed counts if the loss stayed above until the end.
* **Lead time** (``lead_time``): failure step minus the step at which the first ``warning`` or
  ``critical`` event was *emitted* (not the onset step an event reports: a triaged loss spike is
  emitted a few steps after its onset). Warnings emitted after the failure do not count as early
  warning; ``None`` when no warning came at or before the failure.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

__all__ = ["smoothed_loss", "failure_step", "lead_time", "distribution", "per_1000"]

SEVERE = ("warning", "critical")


def smoothed_loss(losses: Sequence[float], smooth: int) -> np.ndarray:
    """Trailing mean of the last ``smooth`` finite values at each index (causal); nan where none."""
    out = np.full(len(losses), math.nan)
    buf: list[float] = []
    for i, x in enumerate(losses):
        if math.isfinite(x):
            buf.append(float(x))
            if len(buf) > smooth:
                buf.pop(0)
        if buf:
            out[i] = sum(buf) / len(buf)
    return out


def failure_step(steps: Sequence[int], losses: Sequence[float], *, margin: float = 0.5, smooth: int = 25,
                 hold: int = 100) -> int | None:
    """The step the run failed at (see the module docstring), or None if it did not."""
    steps = [int(s) for s in steps]
    losses = [float(x) for x in losses]
    nonfinite = next((s for s, x in zip(steps, losses) if not math.isfinite(x)), None)
    end = len(losses) if nonfinite is None else steps.index(nonfinite)
    sm = smoothed_loss(losses[:end], smooth)
    best = np.fmin.accumulate(sm) if len(sm) else sm
    above = [bool(sm[i] > best[i] + margin) if math.isfinite(sm[i]) else False for i in range(end)]
    # above[i] compares with the best up to i; the episode must stay above the best at its start
    for i in range(end):
        if not above[i]:
            continue
        ref = best[i]
        stop = i + hold
        if stop > end and nonfinite is None:
            break  # not enough of the run left to tell
        if all(sm[j] > ref + margin for j in range(i, min(stop, end))):
            return steps[i] if nonfinite is None else min(steps[i], nonfinite)
    return nonfinite


def lead_time(failure: int | None, warnings: Iterable[int]) -> int | None:
    """``failure`` minus the first warning step at or before it; None without either."""
    if failure is None:
        return None
    early = [w for w in warnings if w <= failure]
    return failure - min(early) if early else None


def distribution(values: Sequence[float]) -> dict[str, float]:
    """n, min, first quartile, median, third quartile, max (linear interpolation, numpy's default)."""
    if not len(values):
        return dict(n=0, min=math.nan, q1=math.nan, median=math.nan, q3=math.nan, max=math.nan)
    a = np.asarray(values, dtype=float)
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return dict(n=len(a), min=float(a.min()), q1=float(q1), median=float(med), q3=float(q3), max=float(a.max()))


def per_1000(count: int, steps: int) -> float:
    """``count`` per 1000 steps."""
    return 1000.0 * count / steps if steps else math.nan
