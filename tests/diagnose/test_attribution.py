"""Spikes shared by runs that saw the same data order are attributed to the data."""

from __future__ import annotations

import numpy as np

from seismo.diagnose.engine import diagnose_run
from seismo.store import RunStore


def _run(seed: int, own_spike: int | None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(6000)
    x = 3.0 + np.exp(-t / 1000) + 0.02 * rng.standard_normal(len(t))
    x[[3000, 5000]] += 1.0  # the same hard batches in every run
    if own_spike is not None:
        x[own_spike] += 1.0
    return x


def test_a_spike_at_the_same_step_in_runs_with_the_same_data_order_is_called_data_caused(tmp_path):
    store = tmp_path / "s.sqlite"
    with RunStore(store) as rs:
        for name, seed, own in (("a", 0, 4000), ("b", 1, None), ("c", 2, 2000)):
            x = _run(seed, own)
            rs.record_run(name, metrics=[(i, "loss", float(v)) for i, v in enumerate(x)])
    d = diagnose_run(str(store), "a", compare=["b", "c"])
    assert [(s["step"], s["runs"]) for s in d.shared_spikes] == [(3000, ["b", "c"]), (5000, ["b", "c"])]
    own = [e for e in d.events if e.kind == "loss_spike" and e.step == 4000]
    assert own and "shared_with" not in own[0].evidence  # the run's own spike stays its own
    at = next(e for e in d.events if e.step == 3000)
    assert at.evidence["cause"] == "data" and "caused by the data" in at.message
    assert diagnose_run(str(store), "a").shared_spikes == []  # nothing compared, nothing attributed
