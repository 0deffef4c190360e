"""seismo.sinks.WandB in offline mode, read back from the run's transaction log (.wandb file).

The log is read with ``wandb leet inspect --json``, the W&B CLI's reader of ``.wandb`` files (the
Python ``wandb.sdk.internal.datastore`` reader is gone from recent versions): one JSON record per
line, ``history`` records hold each logged step. The events table's rows are read from the table
files that the log lists under ``files``. No network: ``WANDB_MODE=offline``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import NAN_STEP, sample_events

wandb = pytest.importorskip("wandb")

from seismo.errors import ConfigError  # noqa: E402
from seismo.sinks import WandB  # noqa: E402
from seismo.sinks._base import EVENT_COLUMNS  # noqa: E402


def run_dir(root: Path) -> Path:
    (found,) = list((root / "wandb").glob("offline-run-*"))
    return found


def value(v) -> float:
    return float(v)  # numbers, or the strings "NaN", "Infinity", "-Infinity"


def inspect_log(root: Path) -> list[dict]:
    """Every record of the offline run's .wandb file, as ``wandb leet inspect --json`` prints them."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir(root))],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def read_back(root: Path) -> tuple[dict[str, dict[int, float]], list[dict], dict[str, list[int]]]:
    """({metric: {step: value}}, [event rows], {key: [steps]}) from the offline run's files."""
    directory = run_dir(root)
    metrics: dict[str, dict[int, float]] = {}
    steps_of: dict[str, list[int]] = {}
    table_files = []
    for rec in inspect_log(root):
        if rec["type"] == "history":
            item = rec["history"]["item"]
            step = int(rec["history"].get("step", {}).get("num", item.get("_step", 0)))
            for key, v in item.items():
                steps_of.setdefault(key, []).append(step)
                if key.startswith("_") or key.startswith("seismo/events"):
                    continue
                metrics.setdefault(key, {})[step] = value(v)
        elif rec["type"] == "files":
            table_files += [f["path"] for f in rec["files"]["files"] if f["path"].endswith(".table.json")]
    rows = []
    for path in table_files:
        table = json.loads((directory / "files" / path).read_text())
        assert table["columns"] == list(EVENT_COLUMNS)
        rows += [dict(zip(table["columns"], r)) for r in table["data"]]
    return metrics, rows, steps_of


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_every_metric_and_event_of_the_store_reads_back(offline, monitored_run):
    sink = WandB(project="seismo-test", name="sinks")
    stored = monitored_run([sink])
    metrics, rows, _ = read_back(offline)
    assert set(metrics) == set(stored.series)
    assert "attn/logit_max/transformer.h.0.attn" in metrics
    for name, by_step in stored.series.items():
        assert set(metrics[name]) == set(by_step), name
        bad = [s for s, v in by_step.items() if not same(metrics[name][s], v)]
        assert not bad, (name, bad[:3])
    assert math.isnan(metrics["loss"][NAN_STEP])
    want = sorted((e["step"], e["kind"], e["severity"], e["module"], e["message"], e["advice"]) for e in stored.events)
    got = sorted((r["step"], r["kind"], r["severity"], r["module"], r["message"], r["advice"]) for r in rows)
    assert got == want and len(want) >= 2
    for r in rows:
        ev = next(e for e in stored.events if e["step"] == r["step"] and e["kind"] == r["kind"])
        assert json.loads(r["evidence"]).keys() == ev["evidence"].keys()


def test_one_log_per_step_prefix_non_finite_and_events(offline, monkeypatch):
    sink = WandB(project="p", prefix="seismo/")
    calls = []
    log = sink.run.log
    monkeypatch.setattr(sink.run, "log", lambda d, **k: (calls.append((sorted(d), k.get("step"))), log(d, **k)))
    sink.write_records([(0, {"grad/norm": 1.5, "loss": math.inf}), (1, {"grad/norm": math.nan, "loss": -math.inf, "x": "n/a"})])
    assert calls == [(["seismo/grad/norm", "seismo/loss"], 0), (["seismo/grad/norm", "seismo/loss"], 1)]
    sink.write_events(sample_events()[:2])  # events at step 3, logged at step 3
    sink.write_records([(5, {"loss": 1.0})])
    sink.write_events(sample_events()[2:])  # an event at step 7 after records up to step 5
    sink.close()
    assert wandb.run is None  # the run the sink started is finished
    metrics, rows, steps_of = read_back(offline)
    assert metrics["seismo/grad/norm"][0] == 1.5 and math.isnan(metrics["seismo/grad/norm"][1])
    assert metrics["seismo/loss"] == {0: math.inf, 1: -math.inf, 5: 1.0}
    assert [(r["step"], r["kind"]) for r in rows] == [(3, "loss_spike"), (3, "attention_logit_growth"), (7, "nonfinite")]
    assert rows[1]["module"] == "transformer.h.0.attn" and rows[1]["message"] == "max logit <b>1e4</b> | `x` * 2"
    assert rows[1]["advice"] == "add qk-layernorm (arXiv:2309.14322)" and json.loads(rows[1]["evidence"]) == {"value": math.inf}
    assert [k for k in steps_of if k.startswith("seismo/events")] and 7 in steps_of["seismo/events._type"]


def test_logs_into_the_active_run_and_leaves_it_open(offline):
    run = wandb.init(project="p")
    with pytest.warns(RuntimeWarning, match="existing run"):
        sink = WandB(project="other")
    assert sink.run is run
    sink.write_records([(0, {"loss": 2.0})])
    sink.close()
    assert wandb.run is run  # not finished by the sink
    run.log({"user/metric": 1.0}, step=1)
    run.finish()
    metrics, _, _ = read_back(offline)
    assert metrics["loss"] == {0: 2.0} and metrics["user/metric"] == {1: 1.0}


def test_a_run_found_past_seismos_steps_warns_once_with_the_fix(offline):
    run = wandb.init(project="p")
    for i in range(5):
        run.log({"train/loss": float(i)})  # the run is at step 5
    sink = WandB(run=run)
    with pytest.warns(RuntimeWarning, match="step_metric='seismo/step'"):
        sink.write_records([(0, {"loss": 2.0}), (1, {"loss": 1.5}), (5, {"loss": 1.0})])
    run.finish()
    assert read_back(offline)[0]["loss"] == {5: 1.0}


def test_step_metric_for_a_run_with_its_own_step_counter(offline):
    run = wandb.init(project="p")
    for i in range(10):  # e.g. the Hugging Face WandbCallback, logging without step=
        run.log({"train/loss": float(i)})
    sink = WandB(run=run, prefix="seismo/", step_metric="seismo/step")
    sink.write_records([(0, {"loss": 2.0}), (1, {"loss": 1.5})])
    sink.write_events(sample_events()[:1])
    run.finish()
    metrics, rows, _ = read_back(offline)
    assert sorted(metrics["seismo/loss"].values()) == [1.5, 2.0]  # nothing dropped
    assert sorted(metrics["seismo/step"].values()) == [0.0, 1.0, 3.0]
    assert [r["kind"] for r in rows] == ["loss_spike"]


def test_a_step_below_the_runs_step_is_dropped_with_one_warning(offline):
    sink = WandB(project="p")
    sink.write_records([(10, {"loss": 1.0})])
    with pytest.warns(RuntimeWarning, match="drops step 3"):
        sink.write_records([(3, {"loss": 2.0}), (4, {"loss": 2.0})])
    sink.write_records([(11, {"loss": 3.0})])
    sink.close()
    assert read_back(offline)[0]["loss"] == {10: 1.0, 11: 3.0}


@pytest.mark.parametrize("status, exit_code", [("completed", 0), ("failed", 1)])
def test_a_run_the_sink_started_ends_with_the_callers_status(offline, status, exit_code):
    sink = WandB(project="p")
    sink.set_status(status)
    sink.close()
    (exit_record,) = [r for r in inspect_log(offline) if r["type"] == "exit"]
    assert exit_record["exit"].get("exit_code", 0) == exit_code


def test_a_failing_backend_turns_the_sink_off_with_one_warning(offline, monkeypatch):
    sink = WandB(project="p")

    def broken(*args, **kwargs):
        raise ConnectionError("service gone")

    monkeypatch.setattr(sink.run, "log", broken)
    with pytest.warns(RuntimeWarning, match="WandB is off after a failed write_records: ConnectionError"):
        sink.write_records([(0, {"loss": 1.0})])
    sink.write_events(sample_events())  # silent, never raises
    monkeypatch.undo()
    sink.close()


@pytest.mark.parametrize("kwargs, field", [({"project": 3}, "project"), ({"prefix": None}, "prefix"), ({"step_metric": ""}, "step_metric")])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        WandB(**kwargs)


def test_missing_wandb_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"pip install 'seismo\[wandb\]'"):
        WandB(project="p")
