"""Generated series with known ground truth for the detection benchmark (bench/detection.py).

Two signal families, each a pure function of ``(split seed, index)``:

* ``loss`` — ``a + b exp(-t / tau)`` plus noise. Noise variants: ``gauss`` (constant std),
  ``hetero`` (std proportional to the loss level times a slow random modulation between about
  0.5x and 2x) and ``student_t`` (df 3 or 5, scaled to the same std). Noise levels: std = 0.3%,
  1%, 3% or 8% of the final loss.
* ``grad/norm`` — a decaying-then-flat level times log-normal noise (log-std 0.05 to 0.5;
  ``student_t`` variant: heavy-tailed log noise).

Series families: ``spikes`` (1-3 injected spikes: the positives), ``clean``, ``drift_up`` (a slow
rise of at most about 2 noise-sigma per 64 steps), ``drift_down`` (a second descent), ``plateau``
(progress stops, then resumes) and ``plateau_drop`` (a long plateau ending in a sudden drop, the
grokking shape). Only injected spikes are labelled; every family is scored for false alarms.

A spike: height 3-100 noise sigma (or a relative jump of 5%-200% of the loss, floored at 3
sigma), rising in 1-4 steps, held for 1-30 steps in total, then recovering ``fast`` (time
constant 0.5-3 steps), ``slow`` (10-80 steps) or ``partial`` (settling 20-50% of the height above
the curve for good). Its onset is the first step of the excursion; its end is the last step the
excursion is above one noise sigma.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Episode", "Series", "make_set", "loss_series", "grad_series"]

N_STEPS = 1000
FIRST_ONSET = 150  # every rule has seen >= 128 values by then (llm-foundry's window is 100 here)
MIN_GAP = 150
LOSS_FAMILIES = (("spikes", 0.5), ("clean", 0.2), ("drift_up", 0.1), ("drift_down", 0.05), ("plateau", 0.1),
                 ("plateau_drop", 0.05))
GRAD_FAMILIES = (("spikes", 0.55), ("clean", 0.25), ("drift_up", 0.15), ("drift_down", 0.05))
NOISES = ("gauss", "hetero", "student_t")
LOSS_LEVELS = (0.003, 0.01, 0.03, 0.08)
GRAD_LEVELS = (0.05, 0.15, 0.3, 0.5)


@dataclass
class Episode:
    """One labelled spike. ``height_sigma`` is the injected height over the local noise std."""

    onset: int
    end: int
    height_sigma: float
    duration: int
    recovery: str
    spec: str  # "sigma" or "relative"


@dataclass
class Series:
    name: str
    signal: str  # "loss" or "grad/norm"
    values: np.ndarray
    episodes: list[Episode] = field(default_factory=list)
    family: str = "clean"
    noise: str = "gauss"
    level: float = 0.0


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _pick(rng: np.random.Generator, table) -> str:
    names, p = zip(*table)
    return str(rng.choice(names, p=np.asarray(p) / sum(p)))


def _smooth_walk(rng: np.random.Generator, n: int, scale: float, corr: int = 100) -> np.ndarray:
    """A smooth random curve with values of order ``scale`` (a low-pass filtered walk)."""
    knots = rng.normal(0.0, scale, size=n // corr + 3)
    return np.interp(np.arange(n), np.arange(len(knots)) * corr, knots)


def _unit_noise(rng: np.random.Generator, kind: str, n: int) -> tuple[np.ndarray, int]:
    """Zero-mean, unit-std noise of the given kind (df for student_t, 0 otherwise)."""
    if kind == "student_t":
        df = int(rng.choice([3, 5]))
        return rng.standard_t(df, size=n) / np.sqrt(df / (df - 2)), df
    return rng.standard_normal(n), 0


def _onsets(rng: np.random.Generator, k: int, n: int, tail: int = 40) -> list[int]:
    for _ in range(100):
        cand = sorted(int(x) for x in rng.integers(FIRST_ONSET, n - tail, size=k))
        if all(b - a >= MIN_GAP for a, b in zip(cand, cand[1:])):
            return cand
    return [int(rng.integers(FIRST_ONSET, n - tail))]


def _spike_shape(rng: np.random.Generator, n: int, onset: int, duration: int, recovery: str) -> np.ndarray:
    """Unit-height excursion profile (0 before onset)."""
    shape = np.zeros(n)
    rise = 1 if rng.random() < 0.6 else int(rng.integers(2, 5))
    rise = min(rise, duration)
    t = np.arange(n) - onset
    up = (t >= 0) & (t < rise)
    shape[up] = (t[up] + 1) / rise
    hold = (t >= rise) & (t < duration)
    shape[hold] = 1.0
    after = t >= duration
    ta = t[after] - duration + 1
    if recovery == "fast":
        shape[after] = np.exp(-ta / rng.uniform(0.5, 3.0))
    elif recovery == "slow":
        shape[after] = np.exp(-ta / rng.uniform(10.0, 80.0))
    else:  # partial: settles at a fraction of the height for good
        floor = rng.uniform(0.2, 0.5)
        shape[after] = floor + (1 - floor) * np.exp(-ta / rng.uniform(2.0, 20.0))
    return shape


def _inject_spikes(rng: np.random.Generator, base: np.ndarray, sigma: np.ndarray, n: int, relative_ok: bool,
                   max_duration: int, log_space: bool) -> tuple[np.ndarray, list[Episode]]:
    """Add 1-3 spikes to ``base`` (in log space for grad norms); return the excursion and labels."""
    k = int(rng.integers(1, 4))
    excursion = np.zeros(n)
    episodes = []
    for onset in _onsets(rng, k, n):
        duration = int(round(_loguniform(rng, 1, max_duration)))
        recovery = str(rng.choice(["fast", "slow", "partial"], p=[0.5, 0.35, 0.15]))
        s = sigma[onset]
        if relative_ok and rng.random() < 0.4:
            spec = "relative"
            h = _loguniform(rng, 0.05, 2.0) * base[onset]
            h = max(h, 3.0 * s)
        elif log_space:  # grad norm: a multiplicative factor of 2-100x, at least 3 log-sigma
            spec = "relative"
            h = max(np.log(_loguniform(rng, 2.0, 100.0)), 3.0 * s)
        else:
            spec = "sigma"
            h = _loguniform(rng, 3.0, 100.0) * s
        shape = _spike_shape(rng, n, onset, duration, recovery)
        held = (np.arange(n) >= onset) & (np.arange(n) < onset + duration)
        excursion += h * shape * np.where(held, 1.0 + 0.1 * rng.standard_normal(n), 1.0)  # a noisy top
        above = np.nonzero(h * shape > s)[0]
        end = int(above.max()) if len(above) else onset
        if recovery == "partial":
            end = min(n - 1, onset + duration + 60)
        episodes.append(Episode(onset, max(end, onset), float(h / s), duration, recovery, spec))
    return excursion, episodes


def loss_series(seed: int, index: int, n: int = N_STEPS) -> Series:
    rng = np.random.default_rng([seed, 0, index])
    family = _pick(rng, LOSS_FAMILIES)
    noise = str(rng.choice(NOISES))
    level = float(rng.choice(LOSS_LEVELS))
    t = np.arange(n, dtype=np.float64)
    a, b, tau = rng.uniform(1.5, 4.0), rng.uniform(1.0, 6.0), _loguniform(rng, 50.0, 400.0)
    tt = t.copy()
    t2 = n // 2
    if family in ("plateau", "plateau_drop"):  # progress stops between t1 and t2
        t1 = int(rng.integers(150, 500))
        t2 = t1 + int(rng.integers(100, 350))
        tt = np.where(t < t1, t, np.where(t < t2, t1, t - (t2 - t1)))
    base = a + b * np.exp(-tt / tau)
    sigma0 = level * a
    if noise == "hetero":
        sigma = level * base * np.exp(0.35 * _smooth_walk(rng, n, 1.0))
    else:
        sigma = np.full(n, sigma0)
    unit, df = _unit_noise(rng, noise, n)
    episodes: list[Episode] = []
    extra = np.zeros(n)
    if family == "spikes":
        extra, episodes = _inject_spikes(rng, base, sigma, n, relative_ok=True, max_duration=30, log_space=False)
    elif family == "drift_up":  # at most ~2 sigma per 64 steps, at most 30% of the loss
        t0, length = int(rng.integers(250, 600)), int(rng.integers(200, 400))
        total = min(rng.uniform(0.5, 2.0) * sigma0 * length / 64, 0.3 * a)
        extra = total * np.clip((t - t0) / length, 0, 1)
    elif family == "drift_down":
        t0, length = int(rng.integers(250, 700)), int(rng.integers(100, 300))
        extra = -rng.uniform(0.05, 0.2) * a * np.clip((t - t0) / length, 0, 1)
    elif family == "plateau_drop":  # the plateau ends in a sudden drop (grokking-like)
        drop = rng.uniform(0.2, 0.5) * a
        extra = -drop * (1 - np.exp(-np.clip(t - t2, 0, None) / rng.uniform(5, 30)))
    values = base + extra + sigma * unit
    name = f"loss/{family}/{noise}{df or ''}/{level:g}/{index}"
    return Series(name, "loss", values, episodes, family, noise, level)


def grad_series(seed: int, index: int, n: int = N_STEPS) -> Series:
    rng = np.random.default_rng([seed, 1, index])
    family = _pick(rng, GRAD_FAMILIES)
    noise = str(rng.choice(["gauss", "student_t"]))
    level = float(rng.choice(GRAD_LEVELS))
    t = np.arange(n, dtype=np.float64)
    g0, c, tau = _loguniform(rng, 0.1, 10.0), rng.uniform(0.2, 1.0), _loguniform(rng, 30.0, 300.0)
    log_base = np.log(g0 * (c + np.exp(-t / tau)))
    sigma = np.full(n, level)
    unit, df = _unit_noise(rng, noise, n)
    episodes: list[Episode] = []
    extra = np.zeros(n)
    if family == "spikes":
        extra, episodes = _inject_spikes(rng, log_base, sigma, n, relative_ok=False, max_duration=10, log_space=True)
    elif family == "drift_up":  # the late-training grad-norm rise: x1.5-3 over 300-600 steps
        t0, length = int(rng.integers(200, 500)), int(rng.integers(300, 600))
        extra = np.log(rng.uniform(1.5, 3.0)) * np.clip((t - t0) / length, 0, 1)
    elif family == "drift_down":
        t0, length = int(rng.integers(200, 600)), int(rng.integers(100, 300))
        extra = -np.log(rng.uniform(1.5, 3.0)) * np.clip((t - t0) / length, 0, 1)
    values = np.exp(log_base + extra + sigma * unit)
    name = f"grad/{family}/{noise}{df or ''}/{level:g}/{index}"
    return Series(name, "grad/norm", values, episodes, family, noise, level)


def make_set(seed: int, n_loss: int, n_grad: int) -> list[Series]:
    """The labelled set of one split: ``n_loss`` loss series and ``n_grad`` grad-norm series."""
    return [loss_series(seed, i) for i in range(n_loss)] + [grad_series(seed, i) for i in range(n_grad)]
