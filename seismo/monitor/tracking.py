"""Tracking schedules: plain ``step -> bool`` functions saying on which steps a probe runs
(the Cockpit idea, without classes). Not to be confused with :mod:`seismo.mitigate.schedules`
(learning-rate and sequence-length schedules)."""

from __future__ import annotations

import math
from typing import Callable

__all__ = ["Schedule", "every", "log_spaced"]

Schedule = Callable[[int], bool]


def every(n: int, offset: int = 0) -> Schedule:
    """Track steps ``offset, offset + n, offset + 2n, ...``."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"every(n) needs a positive integer n, got {n!r}")
    return lambda step: step >= offset and (step - offset) % n == 0


def log_spaced(per_decade: int = 10, dense_until: int = 10) -> Schedule:
    """Every step up to ``dense_until``, then ``per_decade`` roughly log-spaced steps per decade."""
    if per_decade < 1:
        raise ValueError("log_spaced needs per_decade >= 1")
    def sched(step: int) -> bool:
        if step <= dense_until:
            return True
        # step is tracked if it is the first integer at or above some 10**(k/per_decade)
        k = math.ceil(per_decade * math.log10(step))
        return math.ceil(10 ** (k / per_decade) - 1e-9) == step
    return sched
