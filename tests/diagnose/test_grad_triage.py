"""grad_spike / update_spike: severity from what the loss does next (issues 13 and 18).

Synthetic series with known noise: the gradient norm is log-normal around 1 (log sd 0.1), the
loss is flat at 2.0 with Gaussian noise sd SIGMA (the loss's noise unit). A x10 gradient-norm
spike at step SPIKE then comes with a flat loss (absorbed: info), a loss rise of several noise
units (warning), a non-finite loss (critical), or no loss at all (today's warning at the onset).
"""

import math
import random

import numpy as np
import pytest

from seismo.diagnose import Diagnoser, SpikeDetector, default_detectors
from seismo.diagnose.replay import records_of, replay_events

SIGMA, SPIKE, N = 0.02, 100, 140


def grad_det(**kw):
    """The grad_spike detector with the default_detectors() settings."""
    return SpikeDetector("grad_spike", "grad/norm", z=6.0, rel=1.0, log=True, module_prefix="grad/norm/", module_z=6.0,
                         consequence="loss", **kw)


def records(rise=0.0, nonfinite_at=None, with_loss=True, module=False, seed=0, n=N, spike_len=1):
    """(step, values): a x10 grad-norm spike at SPIKE (global, or x100 in one small module with
    ``module``), the loss flat + N(0, SIGMA) plus ``rise`` (in noise units) from SPIKE + 1 on."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(n):
        big, small = math.exp(0.1 * rng.standard_normal()), 0.01 * math.exp(0.1 * rng.standard_normal())
        loss = 2.0 + SIGMA * rng.standard_normal()
        if SPIKE <= s < SPIKE + spike_len:
            if module:
                small *= 100.0
            else:
                big *= 10.0
        if s > SPIKE:
            loss += rise * SIGMA
        v = {"grad/norm": math.hypot(big, small), "grad/norm/big": big, "grad/norm/small": small}
        if nonfinite_at is not None and s >= nonfinite_at:
            v["grad/norm"] = math.inf
            loss = math.nan
        if with_loss:
            v["loss"] = loss
        out.append((s, v))
    return out


def stream(det, recs):
    evs = []
    for s, v in recs:
        evs += [(s, e) for e in det.update(s, v)]
    return evs


def final(evs):
    return [(s, e) for s, e in evs if not e.evidence.get("provisional")]


def test_default_detectors_judge_grad_and_update_spikes_by_the_loss():
    kinds = {d.kind: d for d in default_detectors() if isinstance(d, SpikeDetector)}
    assert kinds["grad_spike"].consequence == "loss" and kinds["update_spike"].consequence == "loss"
    assert kinds["loss_spike"].consequence is None


@pytest.mark.parametrize("module", [False, True], ids=["global", "module"])
def test_spike_with_a_flat_noisy_loss_is_info(module):
    evs = stream(grad_det(), records(module=module))
    # reported at the onset (provisional info), then one final info: the loss absorbed it
    assert [(s, e.step, e.severity, bool(e.evidence.get("provisional"))) for s, e in evs] == [
        (SPIKE, SPIKE, "info", True), (SPIKE + 5, SPIKE, "info", False)]
    ev = evs[-1][1]
    assert "absorbed" in ev.message and abs(ev.evidence["consequence_mean_z"]) < 2.0
    assert ev.module == ("small" if module else "big")  # the module that jumped is still named
    # the frozen noise estimate is the loss's own noise unit (within 30 % of SIGMA)
    assert abs(ev.evidence["consequence_noise"] - SIGMA) < 0.3 * SIGMA


@pytest.mark.parametrize("module", [False, True], ids=["global", "module"])
def test_spike_followed_by_a_loss_rise_is_a_warning(module):
    evs = final(stream(grad_det(), records(rise=5.0, module=module)))
    assert [(s, e.step, e.severity) for s, e in evs] == [(SPIKE + 5, SPIKE, "warning")]
    # the mean of 5 observations 5 noise units up: the detector saw about 5 (sd of a 5-mean: 1/sqrt 5)
    assert 3.0 < evs[0][1].evidence["consequence_mean_z"] < 7.0
    assert "rose" in evs[0][1].message


def test_a_rise_of_one_noise_unit_is_still_absorbed():
    evs = final(stream(grad_det(), records(rise=1.0)))
    assert [(e.step, e.severity) for _, e in evs] == [(SPIKE, "info")]


@pytest.mark.parametrize("module", [False, True], ids=["global", "module"])
def test_explosion_with_nonfinite_loss_is_critical(module):
    recs = records(module=module, nonfinite_at=SPIKE + 2, spike_len=2)
    evs = final(stream(grad_det(), recs))
    assert [(s, e.step, e.severity) for s, e in evs] == [(SPIKE + 2, SPIKE, "critical")]
    # with the default detectors the nonfinite detector also reports it, and grad_spike says critical
    diag = Diagnoser(default_detectors())
    for s, v in recs:
        diag(s, v)
    sev = {(e.kind, e.severity) for e in diag.events}
    assert ("grad_spike", "critical") in sev and ("nonfinite", "critical") in sev
    assert ("grad_spike", "warning") not in sev


def test_without_a_loss_the_spike_warns_at_the_onset_as_before():
    evs = stream(grad_det(), records(with_loss=False))
    assert [(s, e.step, e.severity) for s, e in evs] == [(SPIKE, SPIKE, "warning")]
    # ... exactly what the detector without consequence says
    plain = SpikeDetector("grad_spike", "grad/norm", z=6.0, rel=1.0, log=True, module_prefix="grad/norm/", module_z=6.0)
    assert [(s, e.severity, e.module) for s, e in stream(plain, records(with_loss=False))] == [
        (s, e.severity, e.module) for s, e in evs]


def test_a_spike_that_keeps_coming_back_is_a_warning():
    """Spikes every 3 steps (within consequence_steps of each other) are one episode; with the
    flat loss it ends as a warning once it has had ``persist`` spiking observations."""
    rng = np.random.default_rng(3)
    det = grad_det(persist=8)
    evs = []
    for s in range(200):
        g = math.exp(0.1 * rng.standard_normal()) * (10.0 if s >= SPIKE and (s - SPIKE) % 3 == 0 else 1.0)
        evs += [(s, e) for e in det.update(s, {"grad/norm": g, "loss": 2.0 + SIGMA * rng.standard_normal()})]
    fin = final(evs)
    assert [(s, e.step, e.severity, e.evidence["spiking_observations"]) for s, e in fin][0] == (SPIKE + 21, SPIKE, "warning", 8)
    assert "persisted" in fin[0][1].message
    onsets = [e.step for _, e in evs if e.evidence.get("provisional")]
    # one provisional onset and at most one final event per episode (the last one may still be open)
    assert [e.step for _, e in fin] == onsets[: len(fin)] and len(onsets) - len(fin) in (0, 1)


def test_one_final_event_per_episode_and_streaming_equals_replay():
    """Several episodes (absorbed, loss rise, persistent), loss recorded at steps where the
    gradient norm is not: the batch replay gives the same events as streaming record by record."""
    rng = np.random.default_rng(7)
    hist: dict[str, tuple[list, list]] = {k: ([], []) for k in ("loss", "grad/norm", "grad/norm/a", "grad/norm/b", "update/norm")}
    for s in range(600):
        loss = 2.0 + SIGMA * rng.standard_normal() + (6 * SIGMA if 301 <= s < 340 else 0.0)
        hist["loss"][0].append(s)
        hist["loss"][1].append(loss)
        if s % 2 == 0:  # the gradient norms every other step
            a, b = math.exp(0.1 * rng.standard_normal()), 0.01 * math.exp(0.1 * rng.standard_normal())
            a *= 10.0 if s in (100, 300) else 1.0
            b *= 100.0 if s == 200 else 1.0
            for k, v in (("grad/norm", math.hypot(a, b)), ("grad/norm/a", a), ("grad/norm/b", b), ("update/norm", 0.1 * a)):
                hist[k][0].append(s)
                hist[k][1].append(v)
    diag = Diagnoser(default_detectors())
    for s, v in records_of(hist):
        diag(s, v)
    streamed = [(e.kind, e.step, e.severity, e.module) for e in diag.events if e.kind in ("grad_spike", "update_spike")]
    replayed = [(e.kind, e.step, e.severity, e.module) for e in replay_events(hist, default_detectors())
                if e.kind in ("grad_spike", "update_spike")]
    assert streamed == replayed
    finals = [(k, st, sev) for k, st, sev, _ in streamed]
    assert ("grad_spike", 100, "info") in finals and ("grad_spike", 200, "info") in finals
    assert ("grad_spike", 300, "warning") in finals
    for k, st, _ in set(finals):  # per episode: one provisional info and one final event
        assert len([x for x in finals if x[:2] == (k, st)]) == 2


def test_state_survives_checkpoint_resume_mid_episode():
    recs = records(rise=5.0)
    full = stream(grad_det(), recs)
    first = grad_det()
    part = stream(first, recs[: SPIKE + 2])
    second = grad_det()
    second.load_state_dict(first.state_dict())
    part += stream(second, recs[SPIKE + 2:])
    assert [(s, e.step, e.severity) for s, e in part] == [(s, e.step, e.severity) for s, e in full]


def test_a_module_level_shift_becomes_its_new_normal():
    """A module whose norm steps up x10 for good is one episode (a warning after ``persist`` spiking
    observations, with a flat loss); then its window takes the new level, and a later x100 spike in
    the same module is found again (before, a shifted module stayed flagged and blind for good)."""
    rng = np.random.default_rng(5)
    det = grad_det(persist=20)
    evs = []
    for s in range(300):
        big, small = math.exp(0.1 * rng.standard_normal()), 0.01 * math.exp(0.1 * rng.standard_normal())
        small *= (10.0 if s >= 100 else 1.0) * (100.0 if s == 250 else 1.0)
        evs += det.update(s, {"grad/norm": math.hypot(big, small), "grad/norm/big": big, "grad/norm/small": small,
                              "loss": 2.0 + SIGMA * rng.standard_normal()})
    fin = [(e.step, e.module, e.severity) for e in evs if not e.evidence.get("provisional")]
    assert fin[0] == (100, "small", "warning") and "persisted" in evs[1].message
    assert (250, "small", "info") in fin


def test_steps_without_grad_norms_do_not_extend_a_module_episode():
    """Loss every step, gradient norms every 60 (a sparse schedule): one module outlier is one
    spiking observation and the loss that stays flat makes it `info` (loss-only steps were once
    counted as spiking, so 50 of them turned it into a 'persisted' warning)."""
    det = next(d for d in default_detectors() if d.name == "grad_spike")
    rng = random.Random(0)
    events = []
    for s in range(4000):
        v = {"loss": 2.0 + 0.01 * rng.gauss(0, 1)}
        if s % 60 == 0:
            a, b = math.exp(0.02 * rng.gauss(0, 1)), math.exp(0.02 * rng.gauss(0, 1))
            a *= 100 if s == 3000 else 1
            v.update({"grad/norm": math.hypot(10 * b, 0.01 * a), "grad/norm/big": 10 * b, "grad/norm/small": 0.01 * a})
        events += det.update(s, v)
    final = [e for e in events if not e.evidence.get("provisional")]
    assert [(e.severity, e.step, e.module, e.evidence["spiking_observations"]) for e in final] == [("info", 3000, "small", 1)]
