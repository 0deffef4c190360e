"""The loss-spike detector's own tail model: the GPD fit, its quantile, and the warning gate."""

from __future__ import annotations

import math

import numpy as np
import pytest

from seismo.diagnose import Diagnoser
from seismo.diagnose.spikes import SpikeDetector
from seismo.diagnose.stats import TailModel, fit_gpd, gpd_quantile


def _gpd_sample(rng, xi, sigma, n):
    u = rng.random(n)
    return sigma * np.log1p(-u) * -1.0 if xi == 0 else sigma / xi * ((1.0 - u) ** -xi - 1.0)  # inverse CDF


@pytest.mark.parametrize("xi, sigma", [(0.0, 1.0), (0.25, 1.5), (-0.2, 2.0)])
def test_pwm_fit_recovers_the_parameters(xi, sigma):
    rng = np.random.default_rng(0)
    est_xi, est_sigma = fit_gpd(_gpd_sample(rng, xi, sigma, 50_000))
    assert est_xi == pytest.approx(xi, abs=0.03)
    assert est_sigma == pytest.approx(sigma, rel=0.04)


@pytest.mark.parametrize("xi", [0.0, 0.3])
def test_quantile_has_the_asked_exceedance_probability(xi):
    u, sigma, zeta, rate = 2.0, 0.7, 0.1, 1e-5
    q = gpd_quantile(u, xi, sigma, zeta, rate)
    # GPD survival above u (Coles 2001, eq. 4.12): zeta * (1 + xi (q - u) / sigma)^(-1/xi), or exp(-(q - u) / sigma)
    surv = zeta * (math.exp(-(q - u) / sigma) if xi == 0 else (1 + xi * (q - u) / sigma) ** (-1 / xi))
    assert surv == pytest.approx(rate, rel=1e-9)
    assert gpd_quantile(u, xi, sigma, zeta, 0.5) == u  # inside the empirical part


def test_tail_model_extrapolates_a_laplace_tail():
    rng = np.random.default_rng(1)
    tm = TailModel(size=4096)
    assert tm.quantile(1e-4) is None  # too little history
    tm.add_many(rng.laplace(size=4096))
    exact = math.log(0.5 / 1e-4)  # Laplace(0, 1): P(X > q) = exp(-q) / 2
    assert tm.quantile(1e-4) == pytest.approx(exact, rel=0.2)
    assert tm.quantile(0.25) == pytest.approx(math.log(2.0), abs=0.1)  # empirical part
    state = tm.state_dict()
    tm2 = TailModel()
    tm2.load_state_dict(state)
    assert tm2.quantile(1e-4) == tm.quantile(1e-4)


def _spike_events(x, **kw):
    det = SpikeDetector("loss_spike", "loss", z=4.5, rel=0.02, persist=50, triage=True, ramp_z=3.0, level_lag=8, **kw)
    return Diagnoser([det]).replay({"loss": (np.arange(len(x)), x)})


def _healthy(seed, n=40_000):
    """A decaying loss with Student-t (df 3) per-step noise and a slow AR(1) wobble: heavy-tailed and correlated."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    wobble = np.zeros(n)
    e = rng.normal(0, 0.008, n)
    for i in range(1, n):
        wobble[i] = 0.995 * wobble[i - 1] + e[i]
    return 2.0 + 3.0 * np.exp(-t / 3000) + wobble + 0.05 * rng.standard_t(3, n)


def test_heavy_tailed_healthy_runs_warn_rarely_and_every_large_spike_is_reported():
    warn_tail = 0
    for seed in range(3):
        x = _healthy(seed)
        spikes = np.arange(5000, len(x), 5000)
        x[spikes] += 0.9 + 0.7 * np.random.default_rng(seed).random(len(spikes))  # +0.9 to +1.6 nats, one step
        ev_tail = _spike_events(x)
        onsets = {e.step for e in ev_tail if e.kind == "loss_spike"}
        assert set(spikes.tolist()) <= onsets  # every large spike reported, at some severity
        for e in ev_tail:
            if e.kind == "loss_spike" and e.step in set(spikes.tolist()):
                assert e.evidence["steps_to_recover"] is not None and e.evidence["peak_excess"] > 0.6
        warn_tail += sum(e.severity != "info" for e in ev_tail if e.step not in set(spikes.tolist()))
    assert warn_tail <= 1  # 120,000 healthy steps: at most one warning episode per 100,000 steps


def test_a_lasting_level_shift_is_still_a_warning():
    x = _healthy(7, 20_000)
    x[12_000:12_040] += 1.0  # 40 steps a full nat higher: not the noise
    ev = [e for e in _spike_events(x) if e.kind == "loss_spike" and 11_990 <= e.step <= 12_010]
    assert ev and ev[0].severity == "warning"


def test_streaming_equals_replay_with_the_tail_model():
    x = _healthy(3, 8000)
    x[[3000, 5000, 6000]] += 1.2
    x[7000:7030] += 0.8
    det = SpikeDetector("loss_spike", "loss", z=4.5, rel=0.02, persist=50, triage=True, ramp_z=3.0, level_lag=8)
    streamed = [e for s, v in enumerate(x) for e in det.update(s, {"loss": float(v)})]
    replayed = _spike_events(x)  # the Diagnoser adds the playbook's advice; the detector's own fields must be equal
    assert len(replayed) >= 4 and [dict(e.to_dict(), advice="") for e in streamed] == [dict(e.to_dict(), advice="") for e in replayed]


def test_bad_tail_rate_is_refused():
    with pytest.raises(ValueError, match="tail_rate"):
        SpikeDetector("loss_spike", "loss", triage=True, tail_rate=2.0)
