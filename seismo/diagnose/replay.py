"""Replay a whole recorded series through the detectors at once: the same events as streaming.

Streaming a 143,000-step loss log through :class:`~seismo.diagnose.Diagnoser` spends nearly all
its time recomputing window medians one step at a time. The replay computes those statistics for
the whole series with numpy and keeps only the detectors' small state machines in Python:

- :class:`~seismo.diagnose.regression.LossRegressionDetector`: its statistics depend on the raw
  history only, so they are computed in one pass and fed to the same ``decide`` method;
- :class:`~seismo.diagnose.spikes.SpikeDetector` on a plain signal: its window holds only the
  values it accepted, so the replay computes every step's verdict as if all values had been
  accepted (exact while nothing is flagged), jumps to the first flagged step, and runs the
  streaming detector itself from there until its window again equals the raw history;
- every other detector streams over the records that hold one of its signals (a detector whose
  signals are absent from the run is skipped: it would stay silent).

The result is the events, in the order the streaming path emits them (tested equal on real logs).
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Mapping, Sequence

import numpy as np

from seismo.diagnose.detectors import (
    AdamDecorrelationDetector,
    Detector,
    EdgeOfStabilityDetector,
    GrowthDetector,
    NonFiniteDetector,
    StallDetector,
    ThresholdDetector,
)
from seismo.diagnose.regression import LossRegressionDetector
from seismo.diagnose.spikes import SpikeDetector
from seismo.diagnose.stats import diff_noise_rows, median_rows
from seismo.events import Event

__all__ = ["History", "replay_events", "records_of"]

#: ``{signal name: (steps, values)}``, as :func:`seismo.store.load_run` returns a run's metrics.
History = Mapping[str, tuple[Sequence[int], Sequence[float]]]

# (emission record index, detector index, order within the detector) -> event
_Emitted = list[tuple[int, int, int, Event]]


def records_of(history: History) -> list[tuple[int, dict[str, float]]]:
    """The history as step-ordered records ``(step, {name: value})``."""
    by_step: dict[int, dict[str, float]] = defaultdict(dict)
    for name, (steps, vals) in history.items():
        for s, v in zip(np.asarray(steps).tolist(), np.asarray(vals, dtype=np.float64).tolist()):
            by_step[int(s)][name] = v
    return sorted(by_step.items())


def _reads(det: object) -> tuple[str, ...] | None:
    """Name prefixes of the signals a built-in detector reads (None: unknown, feed it everything)."""
    if isinstance(det, SpikeDetector):
        return ((det.signal,) + ((det.module_prefix,) if det.module_prefix else ())
                + ((det.consequence,) if det.consequence else ()))
    if isinstance(det, (GrowthDetector, ThresholdDetector)):
        return (det.prefix,)
    if isinstance(det, AdamDecorrelationDetector):
        return ("adam/ratio_bimodal/", "adam/update_grad_cos")
    if isinstance(det, EdgeOfStabilityDetector):
        return ("hessian/",)
    if isinstance(det, LossRegressionDetector):
        return (det.signal,)
    return None


def replay_events(history: History, detectors: Sequence[Detector]) -> list[Event]:
    """Run fresh ``detectors`` over ``history``; the events in streaming emission order (without advice)."""
    steps_all = np.unique(np.concatenate([np.asarray(steps, dtype=np.int64) for steps, _ in history.values()] or [np.zeros(0, np.int64)]))
    names = list(history)
    records: list[tuple[int, dict[str, float]]] | None = None
    emitted: _Emitted = []
    for d_idx, det in enumerate(detectors):
        reads = _reads(det)
        # a spike detector's consequence signal alone (the loss, for grad_spike) gives it nothing to report
        needs = reads[:-1] if reads and isinstance(det, SpikeDetector) and det.consequence else reads
        if needs is not None and not any(n.startswith(p) for n in names for p in needs):
            continue
        if isinstance(det, LossRegressionDetector) and det.count == 0:
            steps, x = _series(history, det.signal)
            out = _replay_regression(det, steps, x)
        elif (isinstance(det, SpikeDetector) and not det.log and not det.module_prefix and not det.consequence
              and len(det.window) == 0 and det.episode is None):
            steps, x = _series(history, det.signal)
            out = list(_replay_spike(det, steps, x))
        elif isinstance(det, NonFiniteDetector) and not det.active:
            out = _replay_nonfinite(det, history, steps_all)
        elif isinstance(det, StallDetector) and not any(n in ("update/norm", "param/norm") for n in names):
            continue  # the stall rule needs the update size: without it the detector never fires
        else:
            if records is None:
                records = records_of(history)
            out = []
            for step, values in records:
                if reads is None or any(k.startswith(p) for k in values for p in reads):
                    out.extend((step, e) for e in det.update(step, values))
        for order, (emit_step, e) in enumerate(out):
            emitted.append((int(np.searchsorted(steps_all, emit_step)), d_idx, order, e))
    emitted.sort(key=lambda t: t[:3])
    return [e for *_, e in emitted]


def _series(history: History, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one signal, in step order, finite values only (the detectors skip the rest)."""
    steps, vals = history[name]
    s = np.asarray(steps, dtype=np.int64)
    v = np.asarray(vals, dtype=np.float64)
    order = np.argsort(s, kind="stable")
    s, v = s[order], v[order]
    ok = np.isfinite(v)
    return s[ok], v[ok]


def _replay_nonfinite(det: NonFiniteDetector, history: History, steps_all: np.ndarray) -> list[tuple[int, Event]]:
    """Non-finite episodes from aligned arrays; the detector itself words the event at each onset."""
    bad = np.zeros(len(steps_all), dtype=bool)
    for name in ("loss", "grad/nonfinite", "grad/norm"):
        if name in history:
            s, v = np.asarray(history[name][0], dtype=np.int64), np.asarray(history[name][1], dtype=np.float64)
            bad[np.searchsorted(steps_all, s)] |= ~np.isfinite(v) | ((v > 0) if name == "grad/nonfinite" else False)
    onsets = np.flatnonzero(bad & ~np.r_[False, bad[:-1]])
    out: list[tuple[int, Event]] = []
    for i in onsets.tolist():
        step = int(steps_all[i])
        values = {}
        for name, (s, v) in history.items():
            if name in ("loss", "grad/nonfinite", "grad/norm") or name.startswith("grad/norm/"):
                s = np.asarray(s)
                j = np.flatnonzero(s == step)
                if len(j):
                    values[name] = float(np.asarray(v, dtype=np.float64)[j[-1]])
        det.active = False
        out.extend((step, e) for e in det.update(step, values))
    det.active = bool(bad[-1]) if len(bad) else False
    return out


def _replay_regression(det: LossRegressionDetector, steps: np.ndarray, x: np.ndarray) -> list[tuple[int, Event]]:
    level, ref, noise = det.stats.batch(x)
    out: list[tuple[int, Event]] = []
    t0 = det.stats.min_history - 1
    n = len(x)
    if n > t0:
        # While idle (CUSUM at 0, no episode) a step whose u - drift <= 0 changes nothing: jump over them.
        u = np.clip((x - ref) / noise, -det.clip, det.clip)
        moves = np.flatnonzero(u - det.drift > 0.0)
        step_list, x_list, lv, rv, nv = steps.tolist(), x.tolist(), level.tolist(), ref.tolist(), noise.tolist()
        decide = det.decide
        t = t0
        while t < n:
            if det.cusum == 0.0 and det.episode is None:
                k = int(np.searchsorted(moves, t))
                if k == len(moves):
                    break
                t = int(moves[k])
            evs = decide(step_list[t], x_list[t], lv[t], rv[t], nv[t])
            if evs:
                out.extend((step_list[t], e) for e in evs)
            t += 1
    det.hist = deque(x[-det.stats.min_history:].tolist(), maxlen=det.stats.min_history)
    det.count = len(x)
    if len(x) > t0:
        det.last = (float(ref[-1]), float(noise[-1]))
    return out


def _spike_flags(det: SpikeDetector, x: np.ndarray) -> np.ndarray:
    """Indices i >= window at which the streaming detector would flag x[i] if its window held the raw
    x[i - window: i] (the same arithmetic as :meth:`RobustWindow.level_and_noise` and ``update``)."""
    w = det.window.size
    if len(x) <= w or w < max(det.min_history, det.recent, 3):
        return np.zeros(0, dtype=np.int64)
    rows = np.lib.stride_tricks.sliding_window_view(x[:-1], w)  # row j: x[j: j + w], judged against x[j + w]
    lag = det.level_lag
    level = median_rows(rows[:, w - det.recent - lag: w - lag])
    noise = diff_noise_rows(rows)
    scale = np.maximum(np.maximum(noise, det.noise_floor_rel * np.maximum(np.abs(level), 1e-12)), 1e-12)
    xi = x[w:]
    denom = np.maximum(np.abs(level), 1e-12)
    z = (xi - level) / scale
    rel = (xi - level) / denom
    flag = (z > det.z) & (rel > det.rel)
    if det.outlier_z is not None:  # the material-outlier onset (SpikeDetector.update), same arithmetic
        flag |= (z > det.outlier_z) & (xi - level > det.outlier_excess) & (rel > det.rel)
    if det.ramp_z is not None:  # the ramp rule (SpikeDetector._ramp), same arithmetic
        m = np.minimum(np.minimum(x[w - 2:-2], x[w - 1:-1]), x[w:])
        flag |= ((m - level) / scale > det.ramp_z) & ((m - level) / denom > det.rel)
    return np.flatnonzero(flag) + w


def _replay_spike(det: SpikeDetector, steps: np.ndarray, x: np.ndarray) -> list[tuple[int, Event]]:
    w, n, key = det.window.size, len(x), det.signal
    flags = _spike_flags(det, x)
    out: list[tuple[int, Event]] = []
    accepted_run, i = 0, 0
    step_list, x_list = steps.tolist(), x.tolist()
    while i < n:
        if accepted_run >= w and det.in_spike == 0 and det.episode is None:
            k = int(np.searchsorted(flags, i))
            j = int(flags[k]) if k < len(flags) else n
            det.window.values = deque(x_list[j - w: j], maxlen=w)
            det.last3 = deque(x_list[max(j - 3, 0): j], maxlen=3)
            if j >= n:
                break
            i = j
        s = step_list[i]
        out.extend((s, e) for e in det.update(s, {key: x_list[i]}))
        accepted_run = accepted_run + 1 if det.in_spike == 0 and det.episode is None else 0
        i += 1
    return out
