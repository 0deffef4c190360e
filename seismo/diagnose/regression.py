"""Slow instabilities: the loss climbing above its own recent level and staying there.

A spike detector looks at one observation at a time; a *bump* (the loss rising by 0.1-0.5 nats
over hundreds to thousands of steps, then recovering slowly or settling higher, as in the
PolyPythia runs, arXiv 2503.09543) is made of observations that are each unremarkable. It shows
up in a cumulative sum instead.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Mapping

import numpy as np

from seismo.diagnose.stats import diff_noise_rows, median_rows
from seismo.events import Event

__all__ = ["LossRegressionDetector", "RegressionStats"]


class RegressionStats:
    """The statistics the detector decides on, one observation at a time, from the raw history only
    (so that a batch replay can compute them for a whole series at once and get the same numbers).

    - ``level``: the median of the last ``recent`` observations;
    - ``reference``: the median of ``ref`` observations ending ``lag`` observations ago;
    - ``noise``: the robust per-step noise (MAD of first differences, Gaussian-consistent) over
      the last ``noise_window`` observations, floored at ``1e-3 * |reference|``.

    ``reference`` and ``noise`` are refreshed every ``refresh`` observations.
    """

    def __init__(self, recent: int, ref: int, lag: int, noise_window: int, refresh: int):
        self.recent, self.ref, self.lag, self.noise_window, self.refresh = recent, ref, lag, noise_window, refresh
        self.min_history = max(ref + lag, noise_window, recent)

    def batch(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(level, reference, noise) for every observation of ``x`` (NaN before ``min_history``)."""
        n = len(x)
        level, reference, noise = (np.full(n, np.nan) for _ in range(3))
        if n < self.min_history:
            return level, reference, noise
        win = np.lib.stride_tricks.sliding_window_view
        t0 = self.min_history - 1
        level[t0:] = median_rows(win(x, self.recent))[t0 - self.recent + 1:]
        idx = np.arange(t0, n, self.refresh)  # refresh points: observation indices t0, t0 + refresh, ...
        refs = median_rows(win(x, self.ref)[idx - self.lag - self.ref + 1])
        noises = diff_noise_rows(win(x, self.noise_window)[idx - self.noise_window + 1])
        noises = np.maximum(noises, 1e-3 * np.abs(refs))
        held = (np.arange(t0, n) - t0) // self.refresh
        reference[t0:], noise[t0:] = refs[held], noises[held]
        return level, reference, noise

    def one(self, hist: deque, count: int, last: tuple[float, float]) -> tuple[float, float, float]:
        """(level, reference, noise) at observation ``count - 1`` from the last observations in ``hist``."""
        a = np.fromiter(hist, dtype=np.float64)
        level = float(median_rows(a[None, -self.recent:])[0])
        t = count - 1
        if (t - (self.min_history - 1)) % self.refresh:
            return level, *last
        r = float(median_rows(a[None, len(a) - self.lag - self.ref: len(a) - self.lag])[0])
        s = float(diff_noise_rows(a[None, -self.noise_window:])[0])
        return level, r, max(s, 1e-3 * abs(r))


class LossRegressionDetector:
    """The loss rising above its own recent level by a clear, lasting margin (``loss_regression``).

    A one-sided CUSUM (Page 1954, Biometrika 41:100) on the robust, noise-scaled deviation of each
    observation from a lagged reference level: u_t = clip((x_t - reference_t) / noise_t, +-clip),
    S_t = max(0, S_{t-1} + u_t - drift). While training improves, the reference (a median taken
    ``lag`` observations back) lies above the loss, u is negative and S stays at 0; a single
    outlier adds at most ``clip``. An episode opens when S exceeds ``threshold`` *and* the recent
    median stands above the reference by at least ``min_nats`` and by ``min_z`` standard errors
    of that median (noise * sqrt(pi / (2 recent))). Its
    onset is the step at which S last left zero (the CUSUM change-point estimate).

    One ``warning`` per episode, emitted when it opens, with ``step`` = onset and evidence: the
    reference (frozen at the onset), the excess in nats and noise units, ``detected_at``. The
    episode closes when the recent median falls back within ``recover_frac`` of its peak excess
    (or one noise unit) of the frozen reference, or after ``max_episode`` observations (the loss
    settled higher); the event's evidence is then completed in place (``recovered_at``,
    ``steps_to_recover``, ``peak_excess``, ``settled_higher``), which a replay's diagnosis shows
    and a live sink that already wrote the event does not.
    """

    name = "loss_regression"
    kind = "loss_regression"

    def __init__(self, signal: str = "loss", *, recent: int = 32, ref: int = 256, lag: int = 512, noise_window: int = 256,
                 refresh: int = 16, drift: float = 1.0, clip: float = 4.0, threshold: float = 60.0, min_nats: float = 0.06,
                 min_z: float = 3.0, recover_frac: float = 0.25, max_episode: int = 5000):
        self.signal = signal
        self.stats = RegressionStats(recent, ref, lag, noise_window, refresh)
        self.drift, self.clip, self.threshold, self.min_nats, self.min_z = drift, clip, threshold, min_nats, min_z
        self.recover_frac, self.max_episode = recover_frac, max_episode
        # standard error of a median of ``recent`` observations, in per-step noise units (Gaussian: sqrt(pi / 2n))
        self._level_se = math.sqrt(math.pi / (2 * recent))
        self.hist: deque[float] = deque(maxlen=self.stats.min_history)
        self.count = 0
        self.last = (math.nan, math.nan)
        self.cusum, self.start = 0.0, -1
        self.episode: dict | None = None
        self._open_event: Event | None = None

    def update(self, step: int, values: Mapping[str, float]) -> list[Event]:
        x = values.get(self.signal)
        if x is None or not math.isfinite(x):
            return []
        self.hist.append(float(x))
        self.count += 1
        if self.count < self.stats.min_history:
            return []
        level, ref, noise = self.stats.one(self.hist, self.count, self.last)
        self.last = (ref, noise)
        return self.decide(step, float(x), level, ref, noise)

    def decide(self, step: int, x: float, level: float, ref: float, noise: float) -> list[Event]:
        """One step of the CUSUM and episode logic, given the statistics (shared by the replay)."""
        u = min(max((x - ref) / noise, -self.clip), self.clip)
        s = self.cusum + u - self.drift
        if s <= 0.0:
            self.cusum, self.start = 0.0, -1
        else:
            if self.cusum == 0.0:
                self.start = step
            self.cusum = s
        ep = self.episode
        if ep is not None:
            ep["n"] += 1
            excess = level - ep["reference"]
            if excess > ep["peak"]:
                ep["peak"], ep["peak_step"] = excess, step
            if excess <= max(self.recover_frac * ep["peak"], ep["noise"]) or ep["n"] >= self.max_episode:
                self._close(step, settled=ep["n"] >= self.max_episode)
            return []
        excess = level - ref
        if self.cusum > self.threshold and excess > max(self.min_nats, self.min_z * noise * self._level_se):
            onset = self.start if self.start >= 0 else step
            self.episode = dict(onset=onset, reference=ref, noise=noise, peak=excess, peak_step=step, n=0)
            ev = Event(self.kind, "warning", onset, "",
                       f"{self.signal} has climbed {excess:.3g} above its recent level {ref:.4g} ({excess / noise:.1f} noise units) "
                       f"since step {onset} and stays there",
                       dict(reference=ref, level=level, excess=excess, excess_noise=excess / noise, noise=noise,
                            cusum=self.cusum, detected_at=step, recovered_at=None, steps_to_recover=None))
            self._open_event = ev
            return [ev]
        return []

    def _close(self, step: int, settled: bool) -> None:
        ep, ev = self.episode, self._open_event
        assert ep is not None
        if ev is not None:
            ev.evidence.update(peak_excess=ep["peak"], peak_step=ep["peak_step"], settled_higher=settled,
                               recovered_at=None if settled else step, steps_to_recover=None if settled else step - ep["onset"])
        self.episode, self._open_event = None, None
        self.cusum, self.start = 0.0, -1

    def state_dict(self) -> dict:
        return {"hist": list(self.hist), "count": self.count, "last": list(self.last), "cusum": self.cusum,
                "start": self.start, "episode": dict(self.episode) if self.episode else None}

    def load_state_dict(self, state: dict) -> None:
        self.hist = deque(state["hist"], maxlen=self.stats.min_history)
        self.count = int(state["count"])
        self.last = (float(state["last"][0]), float(state["last"][1]))
        self.cusum, self.start = float(state["cusum"]), int(state["start"])
        self.episode = dict(state["episode"]) if state.get("episode") else None
        self._open_event = None
