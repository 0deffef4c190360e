"""Matching alarms to labelled episodes, the same rule for seismo and every peer.

* A labelled episode (onset ``o``, end ``e``) is **hit** when an alarm falls in ``[o, o + tol]``;
  its latency is the first such alarm's step minus ``o``. Each episode counts once (TP or FN).
* Alarms in ``[o, max(e, o + tol)]`` belong to that episode: they are neither extra hits nor
  false positives (a per-step rule that alarms on every step of a 30-step spike is not punished
  30 times, nor is a rule that alarms again during the recovery).
* Every other alarm is a **false positive**, counted per alarm episode: alarms less than
  ``merge`` steps after the previous alarm continue the same alarm episode (one FP).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

__all__ = ["Score", "match", "combine"]

TOL = 10
MERGE = 10


@dataclass
class Score:
    tp: int = 0
    fn: int = 0
    fp: int = 0
    alarms: int = 0  # raw alarm steps, for "alarms per labelled episode"
    latencies: list[int] = field(default_factory=list)
    fp_series: int = 0  # series with at least one false positive

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        if not (p == p and r == r) or p + r == 0:
            return 0.0 if (self.tp + self.fn) else float("nan")
        return 2 * p * r / (p + r)

    @property
    def median_latency(self) -> float:
        return float(np.median(self.latencies)) if self.latencies else float("nan")

    def __iadd__(self, other: "Score") -> "Score":
        self.tp += other.tp
        self.fn += other.fn
        self.fp += other.fp
        self.alarms += other.alarms
        self.latencies += other.latencies
        self.fp_series += other.fp_series
        return self


def match(alarms: Sequence[int], episodes: Iterable, tol: int = TOL, merge: int = MERGE, ignore: Iterable = ()) -> Score:
    """Score one series' alarm steps against its labelled episodes (objects with onset/end).
    Alarms inside an ``ignore`` episode's window count neither way (an injection the hand check
    found invisible in the signal)."""
    skip = list(ignore)
    alarms = sorted(int(a) for a in alarms if not any(e.onset <= a <= max(e.end, e.onset + tol) for e in skip))
    eps = list(episodes)
    s = Score(alarms=len(alarms))
    for ep in eps:
        hits = [a for a in alarms if ep.onset <= a <= ep.onset + tol]
        if hits:
            s.tp += 1
            s.latencies.append(hits[0] - ep.onset)
        else:
            s.fn += 1
    prev = None
    for a in alarms:
        owned = any(ep.onset <= a <= max(ep.end, ep.onset + tol) for ep in eps)
        if not owned and (prev is None or a - prev >= merge):
            s.fp += 1
        if not owned:
            prev = a
    s.fp_series = int(s.fp > 0)
    return s


def combine(scores: Iterable[Score]) -> Score:
    total = Score()
    for s in scores:
        total += s
    return total
