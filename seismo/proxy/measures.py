"""The measures of Wortsman et al. 2023 (arXiv 2309.14322): LR sensitivity, optimal LR,
divergence rate, and the size-scaling fits used to predict instability before it happens."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["lr_sensitivity", "optimal_lr", "divergence_rate", "PowerLaw", "fit_power_law", "predict_unstable_lrs"]


def _capped(losses: Sequence[float], init_loss: float) -> np.ndarray:
    a = np.asarray(losses, dtype=np.float64)
    a = np.where(np.isfinite(a), a, init_loss)  # NaN / inf (diverged) count as the initial loss
    return np.minimum(a, init_loss)


def lr_sensitivity(losses: Sequence[float], init_loss: float) -> float:
    """E_eta[min(l(eta), l0)] - min_eta l(eta) over a (log-spaced) LR grid (Wortsman 2023 §2).

    ``losses`` are the final losses at each LR of the grid; non-finite ones are the initial loss
    ``l0``. The result is >= 0 and is 0 only if every LR reaches the best loss.
    """
    if len(losses) == 0:
        raise ValueError("lr_sensitivity needs at least one loss")
    if not math.isfinite(init_loss):
        raise ValueError(f"init_loss must be finite, got {init_loss}")
    c = _capped(losses, init_loss)
    return float(np.mean(c - c.min()))  # not c.mean() - c.min(): rounding made that -4e-16 for equal losses


def optimal_lr(lrs: Sequence[float], losses: Sequence[float], init_loss: float = math.inf) -> float:
    """The LR with the lowest (capped) final loss."""
    c = _capped(losses, init_loss if math.isfinite(init_loss) else np.inf)
    return float(np.asarray(lrs)[int(np.argmin(c))])


def divergence_rate(statuses: Sequence[str]) -> float:
    return float(np.mean([s == "diverged" for s in statuses])) if statuses else math.nan


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


def predict_unstable_lrs(
    table: dict[float, dict[float, float]], target_size: float, threshold: float
) -> dict[float, tuple[float, bool]]:
    """Wortsman §3.1.2 / §6: per LR, fit max attention logit vs model size (``table[lr][size] =
    logit``) and extrapolate to ``target_size``. Returns ``{lr: (predicted logit, unstable)}``,
    unstable meaning the prediction reaches ``threshold``."""
    out = {}
    for lr, by_size in sorted(table.items()):
        sizes = sorted(s for s in by_size if s < target_size)
        try:
            fit = fit_power_law(sizes, [by_size[s] for s in sizes])
        except ValueError:
            continue
        pred = float(fit(target_size))
        out[lr] = (pred, pred >= threshold)
    return out
