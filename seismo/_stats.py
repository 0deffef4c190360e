"""Small statistics shared across layers: the robust-scale constant and a power-law fit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["MAD_TO_SIGMA", "PowerLaw", "fit_power_law"]

#: 1 / Phi^-1(3/4): multiplying the median absolute deviation by this gives a consistent
#: estimator of the standard deviation for Gaussian data (Rousseeuw & Croux 1993).
MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class PowerLaw:
    """y = exp(intercept) * x ** exponent, fitted in log-log space."""

    exponent: float
    intercept: float
    r2: float

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
    return PowerLaw(float(b), float(a), float(r2))
