"""The batch replay gives exactly the events of the streaming detectors, much faster."""

from __future__ import annotations

import gzip
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest

from seismo.diagnose import Diagnoser, default_detectors
from seismo.diagnose.replay import records_of

DATA = Path(__file__).parent / "data" / "pythia-14m-1-steps-60000-71999.csv.gz"
PYTHIA = Path(os.environ.get("SEISMO_PYTHIA_DIR", Path(__file__).resolve().parents[3] / "shared" / "data" / "pythia"))


def _key(e):
    return (e.kind, e.severity, e.step, e.module, e.message, repr(sorted(e.evidence.items())), e.advice)


def _both(history):
    streamed = Diagnoser(default_detectors())
    for step, values in records_of(history):
        streamed(step, values)
    replayed = Diagnoser(default_detectors())
    replayed.replay(history)
    return streamed.events, replayed.events


def _csv(path: Path) -> dict:
    with gzip.open(path, "rt") as f:
        a = np.loadtxt(f, delimiter=",", skiprows=1)
    return {"loss": (a[:, 0].astype(np.int64), a[:, 1])}


def _synthetic(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    n = 6000
    t = np.arange(n)
    loss = 2.5 + 2.0 * np.exp(-t / 500) + 0.02 * rng.standard_t(3, n)
    loss[1000] += 1.5  # an isolated outlier
    loss[2000:2030] += 0.8  # a slow-to-recover spike
    loss[3000:3600] += 0.25  # a bump
    loss[4500:4700] += 2.0  # long enough to be a divergence
    loss[5000] = math.nan
    grad = np.exp(0.1 * rng.standard_normal(n))
    grad[1500] *= 30
    steps = t * 2  # steps need not be consecutive
    return {"loss": (steps, loss), "grad/norm": (steps, grad), "grad/nonfinite": (steps[::7], np.zeros(len(steps[::7])))}


@pytest.mark.parametrize("seed", [0, 1])
def test_replay_equals_streaming_on_synthetic_series_with_every_loss_event(seed):
    streamed, replayed = _both(_synthetic(seed))
    kinds = {e.kind for e in streamed}
    assert {"loss_spike", "loss_divergence", "loss_regression", "grad_spike", "nonfinite"} <= kinds, kinds
    assert [_key(e) for e in replayed] == [_key(e) for e in streamed]


def test_replay_equals_streaming_on_a_real_pythia_excerpt_and_finds_its_bump():
    history = _csv(DATA)
    streamed, replayed = _both(history)
    assert [_key(e) for e in replayed] == [_key(e) for e in streamed]
    bumps = [e for e in replayed if e.kind == "loss_regression"]
    assert bumps and 65_000 <= bumps[0].step <= 67_500, [(e.kind, e.step) for e in replayed]


def test_replay_is_much_faster_than_streaming():
    history = _csv(DATA)
    t0 = time.perf_counter()
    Diagnoser(default_detectors()).replay(history)
    fast = time.perf_counter() - t0
    d = Diagnoser(default_detectors())
    t0 = time.perf_counter()
    for step, values in records_of(history):
        d(step, values)
    slow = time.perf_counter() - t0
    assert slow / fast > 4, (slow, fast)


@pytest.mark.slow
@pytest.mark.skipif(not PYTHIA.is_dir(), reason="the PolyPythia logs are not on this machine")
@pytest.mark.parametrize("name", sorted(p.name for p in PYTHIA.glob("*.csv.gz")) if PYTHIA.is_dir() else [])
def test_replay_equals_streaming_on_every_real_log(name):
    streamed, replayed = _both(_csv(PYTHIA / name))
    assert [_key(e) for e in replayed] == [_key(e) for e in streamed]
