"""The preconditioner-staleness detector and its playbook entry."""

from __future__ import annotations

import pytest

from seismo.diagnose import PLAYBOOK
from seismo.diagnose.playbook import CAUSES, PRIORITY
from seismo.diagnose.staleness import STALENESS_KIND, PreconditionerStalenessDetector


def feed(det, series, start=0):
    events = []
    for i, values in enumerate(series):
        events += det.update(start + i, values)
    return events


def test_warns_after_three_consecutive_observations_then_critical_once():
    det = PreconditionerStalenessDetector()
    key = "adam/stale_frac/h.0.mlp"
    series = [{key: 0.08}] * 5 + [{key: 0.6}] * 2 + [{key: 0.1}] + [{key: 0.6}] * 3 + [{key: 0.95}] * 4
    events = feed(det, series, start=100)
    assert [(e.step, e.severity, e.module) for e in events] == [(110, "warning", "h.0.mlp"), (111, "critical", "h.0.mlp")]
    assert all(e.kind == STALENESS_KIND for e in events)
    assert events[0].evidence == {"value": 0.6, "limit": 0.5}


def test_silent_before_min_step_on_embeddings_and_on_healthy_runs():
    det = PreconditionerStalenessDetector(min_step=20)
    assert feed(det, [{"adam/stale_frac/h.0": 0.99}] * 10) == []  # steps 0-9
    assert feed(det, [{"adam/stale_frac/transformer.wte": 0.99}] * 10, start=50) == []
    assert feed(det, [{"adam/stale_frac/h.0": 0.1, "adam/stale_frac": 0.99}] * 10, start=100) == []


def test_state_round_trip_keeps_the_count():
    key = "adam/stale_frac/m"
    a = PreconditionerStalenessDetector()
    feed(a, [{key: 0.7}] * 2, start=100)
    b = PreconditionerStalenessDetector()
    b.load_state_dict(a.state_dict())
    assert [e.step for e in feed(b, [{key: 0.7}], start=102)] == [102]
    with pytest.raises(ValueError):
        PreconditionerStalenessDetector(warn=0.9, critical=0.5)


def test_playbook_entry_recommends_calls_that_exist():
    ms = PLAYBOOK[STALENESS_KIND]
    assert ms[0].call == "seismo.mitigate.optimizers.reset_moments" and "2501.06842" in ms[0].paper
    assert STALENESS_KIND in CAUSES and STALENESS_KIND in PRIORITY
    from seismo.mitigate.optimizers import reset_moments
    from seismo.mitigate.transforms import adagc
    assert callable(reset_moments) and callable(adagc)
