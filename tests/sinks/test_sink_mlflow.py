"""seismo.sinks.MLflow, read back through ``MlflowClient`` from a local store (no server).

Two stores: the file store (``file:`` URI; MLflow 3 keeps it behind ``MLFLOW_ALLOW_FILE_STORE``),
where "/" in names is written "." (``loss`` and ``loss/spike_score`` cannot both be files there),
and the SQL store on SQLite (MLflow 3's default), which keeps names and stores +-inf differently.
"""

from __future__ import annotations

import functools
import json
import math
import sys

import pytest
from conftest import NAN_STEP, sample_events

pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from seismo.errors import ConfigError  # noqa: E402
from seismo.sinks import MLflow  # noqa: E402

DOUBLE_MAX = sys.float_info.max


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory):
    pytest.importorskip("sqlalchemy")
    pytest.importorskip("alembic")
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"  # one database per module: creating one takes seconds


@pytest.fixture(params=["file", "sqlite"])
def tracking_uri(request, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the SQL store puts artifacts in ./mlruns
    if request.param == "file":
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        return f"file:{tmp_path / 'mlruns'}"
    return request.getfixturevalue("sqlite_uri")


def read_back(uri: str, run_id: str, tmp_path) -> tuple[dict[str, dict[int, float]], list[dict], str, dict[str, str]]:
    """({metric: {step: value}}, events from seismo/events.json, seismo/events.txt, run tags)."""
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    metrics = {name: {m.step: m.value for m in client.get_metric_history(run_id, name)} for name in run.data.metrics}
    names = {f.path for f in client.list_artifacts(run_id, "seismo")}
    events, text = [], ""
    if names:
        assert names == {"seismo/events.json", "seismo/events.txt"}
        local = client.download_artifacts(run_id, "seismo", str(tmp_path))
        events = json.loads(open(f"{local}/events.json").read())
        text = open(f"{local}/events.txt").read()
    return metrics, events, text, run.data.tags


def mlflow_name(uri: str, name: str) -> str:
    return name.replace("/", ".") if uri.startswith("file:") else name


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_every_metric_and_event_of_the_store_reads_back(tracking_uri, tmp_path, monitored_run):
    sink = MLflow(experiment="seismo-test", run_name="sinks", tracking_uri=tracking_uri)
    stored = monitored_run([sink])
    metrics, events, text, tags = read_back(tracking_uri, sink.run_id, tmp_path)
    name = functools.partial(mlflow_name, tracking_uri)
    assert set(metrics) == {name(n) for n in stored.series}
    assert name("attn/logit_max/transformer.h.0.attn") in metrics and name("loss/spike_score") in metrics
    for n, by_step in stored.series.items():
        assert set(metrics[name(n)]) == set(by_step), n
        bad = [s for s, v in by_step.items() if not same(metrics[name(n)][s], v)]
        assert not bad, (n, bad[:3])
    assert math.isnan(metrics["loss"][NAN_STEP])
    fields = ("step", "kind", "severity", "module", "message", "advice", "evidence")
    want = sorted((tuple(json.dumps(e[f], sort_keys=True) for f in fields) for e in stored.events))
    got = sorted((tuple(json.dumps(e[f], sort_keys=True) for f in fields) for e in events))
    assert got == want and len(want) >= 2
    assert len(text.splitlines()) == len(want) and all(e["kind"] in text for e in stored.events)
    assert tags["seismo.events"].startswith(f"{len(want)} events; last: step ")
    assert MlflowClient(tracking_uri=tracking_uri).get_run(sink.run_id).info.status == "FINISHED"  # closed by its owner


def test_one_batch_per_thousand_values_prefix_and_non_finite(tracking_uri, tmp_path, monkeypatch):
    sink = MLflow(experiment="batches", tracking_uri=tracking_uri, prefix="seismo/")
    calls = []
    log_batch = sink.client.log_batch

    def spy(run_id, metrics, **kwargs):
        calls.append(len(metrics))
        return log_batch(run_id, metrics, **kwargs)

    monkeypatch.setattr(sink.client, "log_batch", spy)
    records = [(s, {f"grad/norm/layer.{i}": float(s * 100 + i) for i in range(100)}) for s in range(25)]  # 2,500 values
    records.append((25, {"loss": math.nan, "up": math.inf, "down": -math.inf, "odd name!": 1.0, "skipped": "n/a"}))
    sink.write_records(records)
    assert calls == [1000, 1000, 504]  # 2,504 numbers; "n/a" is skipped
    sink.close()
    metrics, events, _, _ = read_back(tracking_uri, sink.run_id, tmp_path)
    name = functools.partial(mlflow_name, tracking_uri)
    assert len(metrics) == 104 and events == []
    assert metrics[name("seismo/grad/norm/layer.7")] == {s: float(s * 100 + 7) for s in range(25)}
    assert math.isnan(metrics[name("seismo/loss")][25])
    assert metrics[name("seismo/odd name_")] == {25: 1.0}  # MLflow refuses "!": replaced by "_"
    if tracking_uri.startswith("file:"):
        assert metrics[name("seismo/up")] == {25: math.inf} and metrics[name("seismo/down")] == {25: -math.inf}
    else:  # the SQL store saturates infinities to the largest double
        assert metrics["seismo/up"] == {25: DOUBLE_MAX} and metrics["seismo/down"] == {25: -DOUBLE_MAX}


def test_events_artifacts_and_tag(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file:{tmp_path / 'mlruns'}"
    sink = MLflow(experiment="events", tracking_uri=uri)
    first, second, third = sample_events()
    sink.write_events([first, second])
    sink.write_events([third])
    sink.flush()
    _, events, text, tags = read_back(uri, sink.run_id, tmp_path / "a")
    assert [e["kind"] for e in events] == ["loss_spike", "attention_logit_growth", "nonfinite"]
    assert events[1] == {"step": 3, "kind": "attention_logit_growth", "severity": "critical", "module": "transformer.h.0.attn",
                         "message": "max logit <b>1e4</b> | `x` * 2", "advice": "add qk-layernorm (arXiv:2309.14322)",
                         "evidence": {"value": math.inf}}
    assert text.splitlines()[1] == ("step 3 critical attention_logit_growth in transformer.h.0.attn: max logit <b>1e4</b> | `x` * 2"
                                    " | advice: add qk-layernorm (arXiv:2309.14322)")
    assert tags["seismo.events"] == "3 events; last: step 7 critical nonfinite: loss is nan"
    sink.close()


def test_existing_run_is_used_and_left_open(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file:{tmp_path / 'mlruns'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("mine")).info.run_id
    sink = MLflow(run_id=run_id, tracking_uri=uri, synchronous=True)
    sink.write_records([(0, {"loss": 2.0}), (1, {"loss": 1.0})])
    sink.close()
    assert client.get_run(run_id).info.status == "RUNNING"
    assert {m.step: m.value for m in client.get_metric_history(run_id, "loss")} == {0: 2.0, 1: 1.0}


def test_a_failing_backend_turns_the_sink_off_with_one_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    sink = MLflow(experiment="x", tracking_uri=f"file:{tmp_path / 'mlruns'}")

    def broken(*args, **kwargs):
        raise ConnectionError("tracking server unreachable")

    monkeypatch.setattr(sink.client, "log_batch", broken)
    with pytest.warns(RuntimeWarning, match="MLflow is off after a failed write_records: ConnectionError"):
        sink.write_records([(0, {"loss": 1.0})])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sink.write_records([(1, {"loss": 1.0})])
        sink.write_events(sample_events())
        sink.close()


def test_a_failed_background_batch_is_reported_by_the_next_flush(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file:{tmp_path / 'mlruns'}"
    sink = MLflow(experiment="x", tracking_uri=uri)  # synchronous=False: MLflow's logging thread sends the batches
    MlflowClient(tracking_uri=uri).delete_run(sink.run_id)  # MLflow refuses to log to a deleted run
    sink.write_records([(0, {"loss": 1.0})])  # queued: no error on the training thread
    with pytest.warns(RuntimeWarning, match="MLflow is off after a failed write_records: MlflowException"):
        sink.write_records([(1, {"loss": 1.0})])  # waits for the previous batch, which failed
    assert sink.disabled is not None
    sink.close()


@pytest.mark.parametrize("kwargs, field", [({"experiment": ""}, "experiment"), ({"run_id": 3}, "run_id"),
                                           ({"tracking_uri": ""}, "tracking_uri"), ({"prefix": 1}, "prefix")])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        MLflow(**kwargs)


def test_missing_mlflow_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ImportError, match=r"pip install 'seismo\[mlflow\]'"):
        MLflow(experiment="x")


@pytest.mark.parametrize("status, mlflow_status", [("failed", "FAILED"), ("interrupted", "KILLED"), ("diverged", "FINISHED")])
def test_the_run_ends_with_the_status_the_caller_set(tmp_path, monkeypatch, status, mlflow_status):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file:{tmp_path / 'mlruns'}"
    sink = MLflow(experiment="x", tracking_uri=uri)
    sink.set_status(status)
    sink.close()
    run = MlflowClient(tracking_uri=uri).get_run(sink.run_id)
    assert run.info.status == mlflow_status and run.data.tags["seismo.status"] == status
