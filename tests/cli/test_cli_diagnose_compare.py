"""``seismo diagnose RUN --compare OTHER...``: a spike at the same step in runs that share the data
order is attributed to the data (issue: spike triage, data attribution across runs)."""

from __future__ import annotations

import json

import numpy as np

from seismo.cli import main


def _write_log(path, seed: int, spikes: dict[int, float], steps: int = 3000) -> None:
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    loss = 2.0 + 3.0 * np.exp(-t / 400.0) + rng.normal(0.0, 0.02, steps)
    for step, height in spikes.items():
        loss[step] += height
    path.write_text("step,train/lm_loss\n" + "".join(f"{s},{v:.6f}\n" for s, v in zip(t, loss)))


def test_a_spike_shared_by_runs_of_the_same_data_order_is_called_data_caused(tmp_path, capsys):
    store = str(tmp_path / "s.sqlite")
    # Three runs (different seeds of the noise) share a batch that spikes at step 2000; run "a"
    # also has a spike of its own at step 1200 that the others do not.
    logs = {"a": {2000: 1.2, 1200: 1.0}, "b": {2000: 1.1}, "c": {2001: 0.9}}
    for i, (name, spikes) in enumerate(logs.items()):
        path = tmp_path / f"{name}.csv"
        _write_log(path, seed=i, spikes=spikes)
        assert main(["import", str(path), "--map", "loss=train/lm_loss", "--run", name, "--store", store]) == 0
    capsys.readouterr()

    assert main(["diagnose", "a", "--store", store, "--compare", "b", "c", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    shared = {s["step"]: s["runs"] for s in d["shared_spikes"]}
    assert 2000 in shared and sorted(shared[2000]) == ["b", "c"]
    assert 1200 not in shared  # the run's own spike is not blamed on the data

    assert main(["diagnose", "a", "--store", store, "--compare", "b", "c"]) == 0
    out = capsys.readouterr().out
    assert "Data-caused" in out and "step 2000" in out and "b, c" in out


def test_without_compare_nothing_is_attributed(tmp_path, capsys):
    store = str(tmp_path / "s.sqlite")
    path = tmp_path / "a.csv"
    _write_log(path, seed=0, spikes={2000: 1.2})
    assert main(["import", str(path), "--map", "loss=train/lm_loss", "--run", "a", "--store", store]) == 0
    capsys.readouterr()
    assert main(["diagnose", "a", "--store", store, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shared_spikes"] == []
