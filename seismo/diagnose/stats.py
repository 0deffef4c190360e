"""Streaming statistics the detectors share: a robust window, an online trend fit and a tail model."""

from __future__ import annotations

import math
from collections import deque
from typing import Iterator, Mapping

import numpy as np

from seismo._stats import MAD_TO_SIGMA

__all__ = ["RobustWindow", "TrendFit", "TailModel", "fit_gpd", "gpd_quantile",
           "median_rows", "diff_noise_rows", "module_values", "format_value"]


class RobustWindow:
    """Median and MAD over the last ``size`` *accepted* values.

    Values flagged as outliers are not added (``add`` is the caller's decision), so one spike does
    not widen the band for the next ``size`` steps: the flaw PEERS.md notes in OLMo-core's rule.
    """

    def __init__(self, size: int = 128):
        if size < 4:
            raise ValueError("RobustWindow size must be >= 4")
        self.size = size
        self.values: deque[float] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self.values)

    def add(self, x: float) -> None:
        if math.isfinite(x):
            self.values.append(float(x))

    def median_mad(self) -> tuple[float, float]:
        a = np.fromiter(self.values, dtype=np.float64)
        med = float(np.median(a))
        mad = float(np.median(np.abs(a - med)))
        return med, mad

    def level_and_noise(self, recent: int = 16, lag: int = 0) -> tuple[float, float]:
        """(level, noise): the median of the last ``recent`` values, and the noise scale
        MAD_TO_SIGMA * MAD(first differences) / sqrt(2) over the whole window. With ``lag`` the level
        is the median of the ``recent`` values before the last ``lag`` (a spike that builds over a
        few steps does not drag its own baseline up). Differencing removes a
        slow trend (a decaying loss), which would otherwise inflate the MAD and hide spikes."""
        a = np.fromiter(self.values, dtype=np.float64)
        level = float(np.median(a[-recent - lag: len(a) - lag] if len(a) > lag else a))
        if len(a) < 3:
            return level, 0.0
        d = np.diff(a)
        noise = MAD_TO_SIGMA * float(np.median(np.abs(d - np.median(d)))) / math.sqrt(2.0)
        return level, noise

    def zscore(self, x: float, floor_rel: float = 1e-3) -> float:
        """Robust z-score of ``x``: (x - median) / (1.4826 MAD), with the scale floored at
        ``floor_rel * |median|`` so a perfectly flat history does not make every wiggle a spike."""
        med, mad = self.median_mad()
        scale = max(MAD_TO_SIGMA * mad, floor_rel * abs(med), 1e-12)
        return (x - med) / scale

    def state_dict(self) -> dict:
        return {"size": self.size, "values": list(self.values)}

    def load_state_dict(self, state: dict) -> None:
        self.size = int(state["size"])
        self.values = deque(state["values"], maxlen=self.size)


class TrendFit:
    """Least-squares line through the last ``window`` (step, log value) points.

    ``crossing(threshold)`` extrapolates the fitted exponential growth and returns the step at
    which the value is predicted to reach ``threshold`` (None if it is not growing). Growth-type
    instabilities (attention logits, log Z, activations, sharpness) grow roughly exponentially
    before they fail, so a log-linear fit gives a lead time before the threshold is crossed.
    """

    def __init__(self, window: int = 30, log: bool = True):
        self.window = window
        self.log = log
        self.points: deque[tuple[int, float]] = deque(maxlen=window)

    def add(self, step: int, value: float) -> None:
        if math.isfinite(value) and (not self.log or value > 0):
            self.points.append((step, math.log(value) if self.log else value))

    def __len__(self) -> int:
        return len(self.points)

    def slope_intercept(self) -> tuple[float, float, float]:
        """(slope per step, intercept, r^2) of the fit; slope 0 when there are < 3 points."""
        if len(self.points) < 3:
            return 0.0, 0.0, 0.0
        s = np.array([p[0] for p in self.points], dtype=np.float64)
        y = np.array([p[1] for p in self.points], dtype=np.float64)
        sm, ym = s.mean(), y.mean()
        var = ((s - sm) ** 2).sum()
        if var == 0:
            return 0.0, ym, 0.0
        slope = ((s - sm) * (y - ym)).sum() / var
        intercept = ym - slope * sm
        resid = y - (slope * s + intercept)
        tot = ((y - ym) ** 2).sum()
        r2 = 1.0 - (resid**2).sum() / tot if tot > 0 else 0.0
        return float(slope), float(intercept), float(r2)

    def crossing(self, threshold: float) -> float | None:
        slope, intercept, _ = self.slope_intercept()
        if slope <= 0:
            return None
        target = math.log(threshold) if self.log else threshold
        return (target - intercept) / slope

    def state_dict(self) -> dict:
        return {"window": self.window, "log": self.log, "points": [list(p) for p in self.points]}

    def load_state_dict(self, state: dict) -> None:
        self.window, self.log = int(state["window"]), bool(state["log"])
        self.points = deque((tuple(p) for p in state["points"]), maxlen=self.window)


def fit_gpd(excess: np.ndarray) -> tuple[float, float]:
    """(shape xi, scale sigma) of a generalized Pareto distribution fitted to positive exceedances
    by probability-weighted moments (Hosking & Wallis 1987, Technometrics 29(3), 339-349):
    a0 = mean, a1 = mean of (1 - p_i) x_(i) with plotting positions p_i = (i - 0.35) / n;
    xi = 2 - a0 / (a0 - 2 a1), sigma = 2 a0 a1 / (a0 - 2 a1). Closed form, stable for small samples
    (xi < 0.5). xi is clipped to [-0.5, 0.5] (finite variance); xi > 0 is a heavy (power-law) tail, 0 exponential."""
    x = np.sort(np.asarray(excess, dtype=np.float64))
    n = len(x)
    if n < 2:
        raise ValueError("fit_gpd needs at least 2 exceedances")
    p = (np.arange(1, n + 1) - 0.35) / n
    a0, a1 = float(x.mean()), float(((1.0 - p) * x).mean())
    d = a0 - 2.0 * a1
    if d <= 1e-12 * max(a0, 1e-300):
        return 0.5, max(a0, 1e-12)
    xi = min(max(2.0 - a0 / d, -0.5), 0.5)
    sigma = max(2.0 * a0 * a1 / d, 1e-12)
    return xi, sigma


def gpd_quantile(u: float, xi: float, sigma: float, zeta: float, rate: float) -> float:
    """The level exceeded with probability ``rate`` when a fraction ``zeta`` of observations exceed
    ``u`` and the exceedances are GPD(xi, sigma): u + sigma / xi ((zeta / rate)^xi - 1), or
    u + sigma log(zeta / rate) at xi = 0 (the peaks-over-threshold quantile; Coles 2001, eq. 4.13)."""
    if rate >= zeta:
        return u
    t = zeta / rate
    if abs(xi) < 1e-9:
        return u + sigma * math.log(t)
    return u + sigma / xi * (t**xi - 1.0)


class TailModel:
    """The upper tail of a detector's own residuals: the empirical distribution of the last
    ``size`` of them, and a generalized-Pareto fit (:func:`fit_gpd`) to the top ``tail_frac``, so a
    rate far below 1 / size (one in 100,000 steps) can be turned into a threshold
    (peaks over threshold; Pickands 1975, Coles 2001 ch. 4)."""

    def __init__(self, size: int = 4096, tail_frac: float = 0.1, min_count: int = 500):
        if not 0.0 < tail_frac < 1.0:
            raise ValueError("TailModel tail_frac must be in (0, 1)")
        self.size, self.tail_frac, self.min_count = size, tail_frac, min_count
        self.values: deque[float] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self.values)

    def add_many(self, values: np.ndarray) -> None:
        self.values.extend(float(v) for v in np.asarray(values, dtype=np.float64) if math.isfinite(v))

    def quantile(self, rate: float) -> float | None:
        """The level a residual exceeds with probability ``rate`` (None below ``min_count`` residuals):
        the empirical quantile when rate >= tail_frac, else the GPD extrapolation above the
        empirical (1 - tail_frac) quantile."""
        if len(self.values) < self.min_count:
            return None
        a = np.fromiter(self.values, dtype=np.float64)
        u = float(np.quantile(a, 1.0 - self.tail_frac))
        if rate >= self.tail_frac:
            return float(np.quantile(a, 1.0 - rate))
        exc = a[a > u] - u
        if len(exc) < 10:
            return float(a.max())
        xi, sigma = fit_gpd(exc)
        return gpd_quantile(u, xi, sigma, len(exc) / len(a), rate)

    def state_dict(self) -> dict:
        return {"size": self.size, "tail_frac": self.tail_frac, "min_count": self.min_count, "values": list(self.values)}

    def load_state_dict(self, state: dict) -> None:
        self.size, self.tail_frac, self.min_count = int(state["size"]), float(state["tail_frac"]), int(state["min_count"])
        self.values = deque(state["values"], maxlen=self.size)


def median_rows(a: np.ndarray) -> np.ndarray:
    """The median of each row of a 2-D array, bit-identical to ``np.median(a, axis=1)`` (the middle
    element, or the mean of the two middle ones), by a partial sort: ~10x faster, which the
    replay's sliding windows need."""
    n = a.shape[1]
    if n % 2:
        return np.partition(a, n // 2, axis=1)[:, n // 2]
    p = np.partition(a, (n // 2 - 1, n // 2), axis=1)
    return (p[:, n // 2 - 1] + p[:, n // 2]) / 2


def diff_noise_rows(a: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Per row: MAD_TO_SIGMA * MAD(first differences) / sqrt(2), the robust per-step noise of a
    series whose slow trend the differencing removes (as :meth:`RobustWindow.level_and_noise`).
    Rows are processed ``chunk`` at a time (cache-sized temporaries)."""
    out = np.empty(a.shape[0])
    for lo in range(0, a.shape[0], chunk):
        d = np.diff(a[lo: lo + chunk], axis=1)
        dev = np.abs(d - median_rows(d)[:, None])
        out[lo: lo + chunk] = MAD_TO_SIGMA * median_rows(dev) / math.sqrt(2.0)
    return out


def module_values(values: Mapping[str, float], prefix: str) -> Iterator[tuple[str, float]]:
    """(module, value) for every ``prefix<module>`` key of a record."""
    for k, v in values.items():
        if k.startswith(prefix):
            yield k[len(prefix):], v


def format_value(x: float) -> str:
    """A signal value in event messages: three significant digits."""
    return f"{x:.3g}"
