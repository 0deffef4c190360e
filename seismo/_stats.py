"""Small statistics shared across layers: the robust-scale constant, a power-law fit, and the sweep
measures of Wortsman et al. 2023 (arXiv 2309.14322) that both the proxy lab and the report use."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["MAD_TO_SIGMA", "PowerLaw", "fit_power_law", "lr_sensitivity", "divergence_rate"]

#: 1 / Phi^-1(3/4): multiplying the median absolute deviation by this gives a consistent
#: estimator of the standard deviation for Gaussian data (Rousseeuw & Croux 1993).
MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class PowerLaw:
    """y = exp(intercept) * x ** exponent, fitted in log-log space.

    ``r2`` is the coefficient of determination in log-log space; ``n`` the number of points fitted.
    With two points a line passes through both and ``r2`` is 1 by construction: it says nothing.
    """

    exponent: float
    intercept: float
    r2: float
    n: int = 0

    def __call__(self, x: float | np.ndarray) -> float | np.ndarray:
        return np.exp(self.intercept) * np.asarray(x, dtype=np.float64) ** self.exponent


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> PowerLaw:
    """Least squares on (log x, log y); needs at least two points with positive finite values."""
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(xa) & np.isfinite(ya) & (xa > 0) & (ya > 0)
    if ok.sum() < 2:
        raise ValueError("a power-law fit needs at least two positive points")
    lx, ly = np.log(xa[ok]), np.log(ya[ok])
    b, a = np.polyfit(lx, ly, 1)
    pred = a + b * lx
    tot = ((ly - ly.mean()) ** 2).sum()
    r2 = 1.0 - ((ly - pred) ** 2).sum() / tot if tot > 0 else 1.0
    return PowerLaw(float(b), float(a), float(r2), int(ok.sum()))


def lr_sensitivity(losses: Sequence[float], init_loss: float) -> float:
    """LR sensitivity, ``E_lr[min(l(lr), l0)] - min_lr l(lr)`` over a (log-spaced) LR grid (Wortsman
    et al. 2023 §2, arXiv 2309.14322).

    ``losses`` are the final losses at each LR of the grid; non-finite ones (diverged) count as the
    initial loss ``l0``. The result is >= 0 and is 0 only if every LR reaches the best loss.
    """
    if len(losses) == 0:
        raise ValueError("lr_sensitivity needs at least one loss")
    if not math.isfinite(init_loss):
        raise ValueError(f"init_loss must be finite, got {init_loss}")
    a = np.asarray(losses, dtype=np.float64)
    c = np.minimum(np.where(np.isfinite(a), a, init_loss), init_loss)
    return float(np.mean(c - c.min()))  # not c.mean() - c.min(): rounding made that -4e-16 for equal losses


def divergence_rate(statuses: Sequence[str]) -> float:
    """The fraction of trials whose status is ``diverged`` (NaN for no trial)."""
    return float(np.mean([s == "diverged" for s in statuses])) if len(statuses) else math.nan
