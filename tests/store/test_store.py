"""Tests for the SQLite run store (seismo.store)."""

from __future__ import annotations

import gc
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seismo.store import (
    APPLICATION_ID,
    SCHEMA_VERSION,
    AsyncWriter,
    RunData,
    RunInfo,
    RunStore,
    StoreError,
    StoreWriteWarning,
    default_store_path,
    load_run,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "project" / "seismo.sqlite"


@pytest.fixture
def store(store_path: Path):
    with RunStore(store_path) as s:
        yield s


def _steps_per_value(steps: np.ndarray) -> dict[int, int]:
    unique, counts = np.unique(steps, return_counts=True)
    return dict(zip(unique.tolist(), counts.tolist()))


# ---------------------------------------------------------------------------
# Opening, schema
# ---------------------------------------------------------------------------


def test_open_creates_parent_dir_wal_and_versioned_schema(store_path: Path) -> None:
    assert not store_path.parent.exists()
    RunStore(store_path).close()
    assert store_path.is_file()
    conn = sqlite3.connect(store_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"runs", "metrics", "events"} <= tables
        index_cols = [r[2] for r in conn.execute("PRAGMA index_info(metrics_run_name_step)")]
        assert index_cols == ["run_id", "name", "step"]
        event_cols = [r[1] for r in conn.execute("PRAGMA table_info(events)")]
        assert "advice" in event_cols and "event_id" in event_cols
        run_cols = [r[1] for r in conn.execute("PRAGMA table_info(runs)")]
        assert run_cols == ["run_id", "name", "created_at", "status", "config_json", "meta_json", "heartbeat"]
    finally:
        conn.close()


def test_reopen_keeps_data(store_path: Path) -> None:
    with RunStore(store_path) as s:
        run = s.create_run("a", config={"lr": 0.1})
        s.log_metrics(run, [(0, "loss", 1.5)])
    with RunStore(store_path) as s:
        assert s.find_run("a").config == {"lr": 0.1}
        steps, values = s.series(run, "loss")
        assert steps.tolist() == [0] and values.tolist() == [1.5]


def test_newer_schema_version_raises(store_path: Path) -> None:
    RunStore(store_path).close()
    conn = sqlite3.connect(store_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}"):
        RunStore(store_path)


def test_foreign_sqlite_file_is_rejected_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE unrelated (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not a seismo run store"):
        RunStore(path)
    conn = sqlite3.connect(path)
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    conn.close()
    assert tables == ["unrelated"]


def test_garbage_file_raises_store_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError):
        RunStore(path)


def test_closed_store_raises(store_path: Path) -> None:
    s = RunStore(store_path)
    s.close()
    s.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        s.runs()


def test_default_store_path_is_one_file_per_project(tmp_path: Path) -> None:
    assert default_store_path(tmp_path) == tmp_path / ".seismo" / "seismo.sqlite"


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


def test_metrics_roundtrip_including_non_finite(store: RunStore) -> None:
    run = store.create_run("r")
    logged = [
        (3, "loss", float("nan")),
        (1, "loss", float("inf")),
        (2, "loss", float("-inf")),
        (0, "loss", np.float32(0.25)),
        (4, "loss", -0.0),
        (np.int64(2**40), "loss", 1e308),
        (0, "grad_norm", 5e-324),
    ]
    store.log_metrics(run, logged)

    steps, values = store.series(run, "loss")
    assert steps.dtype == np.int64 and values.dtype == np.float64
    assert steps.tolist() == [0, 1, 2, 3, 4, 2**40]  # sorted by step
    assert values[0] == 0.25
    assert values[1] == math.inf and values[2] == -math.inf
    assert math.isnan(values[3])
    assert values[4] == 0.0  # SQLite does not keep the sign of -0.0
    assert values[5] == 1e308
    assert store.series(run, "grad_norm")[1].tolist() == [5e-324]
    assert store.metric_names(run) == ["grad_norm", "loss"]


def test_series_of_unknown_metric_is_empty_but_unknown_run_raises(store: RunStore) -> None:
    run = store.create_run("r")
    steps, values = store.series(run, "nothing")
    assert steps.shape == (0,) and values.shape == (0,)
    with pytest.raises(StoreError, match="no run 999"):
        store.series(999, "loss")
    with pytest.raises(StoreError, match="no run 999"):
        store.metric_names(999)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(
        st.tuples(
            st.integers(min_value=-(2**63), max_value=2**63 - 1),
            st.sampled_from(["a", "b", "grad/norm", "λ"]),
            st.floats(allow_nan=True, allow_infinity=True),
        ),
        max_size=30,
    )
)
def test_metrics_roundtrip_property(tmp_path_factory: pytest.TempPathFactory, rows) -> None:
    path = tmp_path_factory.getbasetemp() / "property.sqlite"
    with RunStore(path, durable=False) as s:
        run = s.create_run("prop")
        s.log_metrics(run, rows)
        assert s.metric_names(run) == sorted({name for _, name, _ in rows})
        for name in s.metric_names(run):
            # stable sort by step keeps insertion order among equal steps, like the store
            expected = sorted(((st_, v) for st_, n, v in rows if n == name), key=lambda r: r[0])
            steps, values = s.series(run, name)
            assert steps.tolist() == [e[0] for e in expected]
            np.testing.assert_array_equal(values, np.array([e[1] for e in expected]))


def test_failing_row_mid_batch_leaves_nothing_of_that_batch(store: RunStore) -> None:
    run = store.create_run("r")
    store.log_metrics(run, [(0, "loss", 1.0)])

    consumed = []

    def batch():
        for step in range(1, 101):
            consumed.append(step)
            # row 51 has an invalid name; rows before it are already inserted
            yield (step, None if step == 51 else "loss", float(step))

    with pytest.raises(StoreError, match="metric name"):
        store.log_metrics(run, batch())
    assert len(consumed) == 51  # the failure really happened mid-batch
    steps, values = store.series(run, "loss")
    assert steps.tolist() == [0] and values.tolist() == [1.0]


def test_combined_log_is_one_transaction(store: RunStore) -> None:
    run = store.create_run("r")
    metrics = [(s, "loss", 1.0) for s in range(10)]
    events = [{"kind": "spike", "step": 1}, {"kind": "spike", "stpe": 2}]  # typo'd key
    with pytest.raises(StoreError, match="unknown event keys"):
        store.log(run, metrics=metrics, events=events)
    assert store.metric_names(run) == []
    assert store.events(run) == []
    store.log(run, metrics=metrics, events=events[:1])
    assert len(store.series(run, "loss")[0]) == 10 and len(store.events(run)) == 1


def test_logging_to_missing_run_raises_and_writes_nothing(store: RunStore, store_path) -> None:
    with pytest.raises(StoreError, match="no run 42"):
        store.log_metrics(42, [(0, "loss", 1.0)])
    conn = sqlite3.connect(store_path)
    assert conn.execute("SELECT count(*) FROM metrics").fetchone()[0] == 0
    conn.close()


def test_non_integer_step_is_rejected(store: RunStore) -> None:
    run = store.create_run("r")
    with pytest.raises(StoreError, match="step must be an integer"):
        store.log_metrics(run, [(1.5, "loss", 1.0)])


# ---------------------------------------------------------------------------
# Runs and events
# ---------------------------------------------------------------------------


def test_create_run_info_status_and_meta(store: RunStore) -> None:
    run = store.create_run("exp", config={"lr": 3e-4, "layers": [1, 2]}, meta={"host": "a"})
    info = store.find_run(run)
    assert isinstance(info, RunInfo)
    assert info.status == "running"
    assert info.config == {"lr": 3e-4, "layers": [1, 2]}
    assert info.created_at.endswith("+00:00")  # ISO 8601, UTC
    with pytest.raises(AttributeError):
        info.status = "x"  # type: ignore[misc]

    store.set_status(run, "finished")
    store.update_meta(run, {"gpu": "none", "host": "b"})
    store.update_meta(run, {"seed": np.int64(7)})
    info = store.find_run(run)
    assert info.status == "finished"
    assert info.meta == {"host": "b", "gpu": "none", "seed": 7}
    with pytest.raises(StoreError):
        store.set_status(12345, "failed")
    with pytest.raises(StoreError):
        store.update_meta(12345, {"a": 1})


def test_find_run_by_id_and_name(store: RunStore) -> None:
    with pytest.raises(StoreError, match="has no runs"):
        store.find_run("anything")
    first = store.create_run("baseline")
    other = store.create_run("other")
    second = store.create_run("baseline")

    assert store.find_run(first).name == "baseline"
    assert store.find_run(np.int64(other)).name == "other"
    assert store.find_run(str(other)).run_id == other
    assert store.find_run("baseline").run_id == second  # latest with that name
    assert [r.run_id for r in store.runs()] == [first, other, second]
    with pytest.raises(StoreError, match="no run 'missing'.*baseline"):
        store.find_run("missing")
    with pytest.raises(StoreError, match="no run 99"):
        store.find_run(99)


def test_numeric_name_falls_back_to_name_lookup(store: RunStore) -> None:
    run = store.create_run("2024")
    assert store.find_run("2024").run_id == run


def test_events_roundtrip_and_filter(store: RunStore) -> None:
    run = store.create_run("r")
    events = [
        {
            "step": 10,
            "kind": "loss_spike",
            "severity": "warning",
            "module": "encoder.layer.3",
            "message": "loss jumped 8x",
            "evidence": {"ratio": np.float32(8.0), "window": np.arange(3), "nan": math.nan},
            "advice": "lower the learning rate",
        },
        {"kind": "nan_grad", "step": 11},
        {"kind": "loss_spike", "step": 12, "evidence": {"ratio": 3}},
    ]
    store.log_events(run, events)

    got = store.events(run)
    assert [e["kind"] for e in got] == ["loss_spike", "nan_grad", "loss_spike"]
    first = got[0]
    assert first["module"] == "encoder.layer.3" and first["advice"] == "lower the learning rate"
    assert first["evidence"]["ratio"] == 8.0 and first["evidence"]["window"] == [0, 1, 2]
    assert math.isnan(first["evidence"]["nan"])
    assert got[1]["evidence"] == {} and got[1]["severity"] is None
    assert all(e["run_id"] == run for e in got)
    assert [e["step"] for e in store.events(run, kind="loss_spike")] == [10, 12]
    assert store.events(run, kind="unknown") == []


def test_event_without_kind_is_rejected(store: RunStore) -> None:
    run = store.create_run("r")
    with pytest.raises(StoreError, match="kind"):
        store.log_events(run, [{"step": 1, "message": "no kind"}])


# ---------------------------------------------------------------------------
# load_run / RunData
# ---------------------------------------------------------------------------


def test_load_run(store_path: Path) -> None:
    with RunStore(store_path) as s:
        run = s.create_run("exp", config={"bs": 8})
        s.log_metrics(run, [(1, "loss", 2.0), (0, "loss", 3.0), (0, "acc", math.nan)])
        s.log_events(run, [{"kind": "spike", "step": 1}])
        s.create_run("exp2")

    data = load_run(store_path, "exp")
    assert isinstance(data, RunData)
    assert data.info.run_id == run and data.info.config == {"bs": 8}
    assert sorted(data.metrics) == ["acc", "loss"]
    steps, values = data.series("loss")
    assert steps.tolist() == [0, 1] and values.tolist() == [3.0, 2.0]
    assert math.isnan(data.series("acc")[1][0])
    assert [e["kind"] for e in data.events] == ["spike"]
    with pytest.raises(KeyError, match="available: acc, loss"):
        data.series("grad_norm")
    assert load_run(store_path, run).info.name == "exp"


def test_load_run_missing_store_or_run(tmp_path: Path, store_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        load_run(tmp_path / "nope.sqlite", "x")
    assert not (tmp_path / "nope.sqlite").exists()
    RunStore(store_path).close()
    with pytest.raises(StoreError, match="no run"):
        load_run(store_path, "x")


# ---------------------------------------------------------------------------
# Concurrency and durability
# ---------------------------------------------------------------------------


def test_concurrent_reader_sees_whole_batches_while_writer_thread_writes(store_path) -> None:
    rows_per_batch, n_batches = 100, 150
    with RunStore(store_path) as s:
        run = s.create_run("live")

    writer = AsyncWriter(store_path, run, flush_every_s=0.0)
    for step in range(n_batches):  # non-blocking: all queued at once
        writer.put_metrics([(step, "x", float(i)) for i in range(rows_per_batch)])

    observed_sizes = set()
    with RunStore(store_path) as reader:
        while True:
            steps, _ = reader.series(run, "x")
            per_step = _steps_per_value(steps)
            assert set(per_step.values()) <= {rows_per_batch}  # only whole batches
            assert sorted(per_step) == list(range(len(per_step)))  # a prefix of the batches
            observed_sizes.add(len(per_step))
            if len(per_step) == n_batches:
                break
    writer.close()
    assert not writer.failed
    assert len(observed_sizes) > 1  # the reader really ran while the writer wrote


def test_two_writers_in_parallel_do_not_hit_locked_errors(store_path: Path) -> None:
    with RunStore(store_path) as s:
        runs = [s.create_run("a"), s.create_run("b")]
    errors: list[BaseException] = []

    def write(run_id: int) -> None:
        try:
            with RunStore(store_path, durable=False) as s:
                for step in range(60):
                    s.log_metrics(run_id, [(step, "x", 1.0)] * 20)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with RunStore(store_path) as s:
        assert [len(s.series(r, "x")[0]) for r in runs] == [1200, 1200]


_KILL_CHILD = textwrap.dedent(
    """
    import sys
    import time
    from seismo.store import AsyncWriter, RunStore
    path, mode = sys.argv[1], sys.argv[2]
    store = RunStore(path)
    run = store.create_run("victim")
    writer = AsyncWriter(path, run, flush_every_s=0.005) if mode == "async" else None
    step = 0
    while True:
        rows = [(step, "m", float(i)) for i in range(100)]
        if writer is None:
            store.log_metrics(run, rows)
        else:
            writer.put_metrics(rows)
            if step == 0:
                writer.flush()
        if step == 0:
            print("ready", flush=True)
        step += 1
        time.sleep(0.001)  # stands in for the training step (releases the GIL)
    """
)


@pytest.mark.parametrize("mode", ["direct", "async"])
def test_kill_9_leaves_consistent_file_with_whole_batches(store_path: Path, mode: str) -> None:
    store_path.parent.mkdir(parents=True)
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=pythonpath)
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_CHILD, str(store_path), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(0.4)  # let it write many more batches, then kill mid-stream
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    conn = sqlite3.connect(store_path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    with RunStore(store_path) as s:
        run = s.find_run("victim").run_id
        steps, values = s.series(run, "m")
    per_step = _steps_per_value(steps)
    assert len(per_step) >= 2
    assert set(per_step.values()) == {100}  # whole batches only
    assert sorted(per_step) == list(range(len(per_step)))
    assert np.isfinite(values).all()


# ---------------------------------------------------------------------------
# AsyncWriter
# ---------------------------------------------------------------------------


def _count_rows(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT count(*) FROM metrics").fetchone()[0]
    finally:
        conn.close()


def test_async_writer_flush_commits_and_batches_until_then(store_path: Path) -> None:
    with RunStore(store_path) as s:
        run = s.create_run("r")
    writer = AsyncWriter(store_path, run, flush_every_s=60.0)
    try:
        writer.put_metrics([(0, "loss", 1.0), (0, "acc", math.inf)])
        writer.put_events([{"kind": "spike", "step": 0, "evidence": {"z": 9.5}}])
        time.sleep(0.2)
        assert _count_rows(store_path) == 0  # still batched in memory
        writer.flush()
        assert _count_rows(store_path) == 2
        writer.put_metrics([(1, "loss", math.nan)])
        writer.flush()
    finally:
        writer.close()
    data = load_run(store_path, run)
    assert data.series("loss")[0].tolist() == [0, 1]
    assert math.isnan(data.series("loss")[1][1])
    assert data.series("acc")[1].tolist() == [math.inf]
    assert data.events[0]["evidence"] == {"z": 9.5}


def test_async_writer_commits_periodically_without_flush(store_path: Path) -> None:
    with RunStore(store_path) as s:
        run = s.create_run("r")
    with AsyncWriter(store_path, run, flush_every_s=0.05) as writer:
        writer.put_metrics([(0, "loss", 1.0)])
        deadline = time.monotonic() + 5
        while _count_rows(store_path) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _count_rows(store_path) == 1


def test_async_writer_close_flushes_and_is_idempotent(store_path: Path) -> None:
    with RunStore(store_path) as s:
        run = s.create_run("r")
    writer = AsyncWriter(store_path, run, flush_every_s=60.0)
    rows = [(step, "loss", float(step)) for step in range(500)]
    writer.put_metrics(rows)
    writer.close()
    assert _count_rows(store_path) == 500
    writer.close()
    writer.flush()  # no-op after close
    writer.put_metrics([(999, "loss", 0.0)])  # dropped, does not raise
    writer.close()
    assert _count_rows(store_path) == 500


def test_async_writer_copies_rows_at_put_time(store_path: Path) -> None:
    with RunStore(store_path) as s:
        run = s.create_run("r")
    with AsyncWriter(store_path, run, flush_every_s=60.0) as writer:
        rows = [(0, "loss", 1.0)]
        writer.put_metrics(rows)
        rows.append((1, "loss", 2.0))  # caller reuses its list
    assert _count_rows(store_path) == 1


def test_async_writer_is_flushed_when_garbage_collected(store_path: Path) -> None:
    with RunStore(store_path) as s:
        run = s.create_run("r")
    writer = AsyncWriter(store_path, run, flush_every_s=60.0)
    writer.put_metrics([(0, "loss", 1.0)])
    del writer
    gc.collect()
    assert _count_rows(store_path) == 1


def _store_write_warnings(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in caught if issubclass(w.category, StoreWriteWarning)]


def test_async_writer_failure_warns_once_and_drops_later_writes(store_path: Path) -> None:
    with RunStore(store_path) as s:
        run = s.create_run("r")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        writer = AsyncWriter(store_path, run, flush_every_s=60.0)
        writer.put_metrics([(0, "loss", 1.0)])
        writer.flush()
        assert not writer.failed
        writer.put_metrics([(1, "loss", 1.0), (2, None, 1.0)])  # bad row -> commit fails
        writer.flush()
        assert writer.failed
        writer.put_metrics([(3, "loss", 1.0)])  # dropped
        writer.put_events([{"kind": "spike"}])
        writer.put_metrics([(4, None, 1.0)])  # would fail again, must not warn again
        writer.flush()
        writer.close()
        writer.close()
    found = _store_write_warnings(caught)
    assert len(found) == 1
    assert "metric name" in str(found[0].message)
    with RunStore(store_path) as s:
        assert s.series(run, "loss")[0].tolist() == [0]
        assert s.events(run) == []


def test_async_writer_unopenable_store_does_not_raise(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        writer = AsyncWriter(blocker / "store.sqlite", run_id=1, flush_every_s=0.0)
        for step in range(5):
            writer.put_metrics([(step, "loss", 1.0)])
        writer.flush()
        writer.close()
    assert writer.failed
    found = _store_write_warnings(caught)
    assert len(found) == 1 and "cannot open store" in str(found[0].message)


def test_async_writer_never_raises_even_if_warnings_are_errors(store_path: Path) -> None:
    with RunStore(store_path) as s:
        run = s.create_run("r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        writer = AsyncWriter(store_path, run, flush_every_s=0.0)
        writer.put_metrics([(0, 123, 1.0)])  # non-str name
        writer.flush()
        writer.put_metrics([(1, "loss", 1.0)])
        writer.close()
    assert writer.failed
    assert _count_rows(store_path) == 0


def test_async_writer_drops_batches_with_one_warning_when_it_cannot_keep_up(
    store_path: Path,
) -> None:
    with RunStore(store_path) as s:
        run = s.create_run("r")
    blocker = sqlite3.connect(store_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # hold the write lock: the writer's commit must wait
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            writer = AsyncWriter(store_path, run, flush_every_s=0.0, max_queue=2)
            writer.put_metrics([(1, "loss", 1.0)])
            deadline = time.monotonic() + 5
            while writer._worker.queue.qsize() and time.monotonic() < deadline:
                time.sleep(0.005)  # wait until the writer took batch 1 and is blocked
            time.sleep(0.05)
            for step in (2, 3, 4, 5):  # 2 and 3 fill the queue; 4 and 5 are dropped
                writer.put_metrics([(step, "loss", 1.0)])
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    writer.close()
    found = _store_write_warnings(caught)
    assert len(found) == 1 and "cannot keep up" in str(found[0].message)
    assert not writer.failed
    with RunStore(store_path) as s:
        assert s.series(run, "loss")[0].tolist() == [1, 2, 3]


# ---------------------------------------------------------------------------
# Opening files that are not (yet) stores; migration
# ---------------------------------------------------------------------------

# The version-1 schema as it was shipped (copied here, not imported: the test must not follow the code).
_V1_DDL = [
    "CREATE TABLE runs (run_id INTEGER PRIMARY KEY, name TEXT NOT NULL, created_at TEXT NOT NULL, "
    "status TEXT NOT NULL, config_json TEXT NOT NULL DEFAULT '{}', meta_json TEXT NOT NULL DEFAULT '{}')",
    "CREATE INDEX runs_name ON runs(name)",
    "CREATE TABLE metrics (run_id INTEGER NOT NULL REFERENCES runs(run_id), step INTEGER NOT NULL, name TEXT NOT NULL, value REAL)",
    "CREATE INDEX metrics_run_name_step ON metrics(run_id, name, step)",
    "CREATE TABLE events (event_id INTEGER PRIMARY KEY AUTOINCREMENT, run_id INTEGER NOT NULL REFERENCES runs(run_id), "
    "step INTEGER, kind TEXT NOT NULL, severity TEXT, module TEXT, message TEXT, evidence_json TEXT NOT NULL DEFAULT '{}', advice TEXT)",
    "CREATE INDEX events_run_kind_step ON events(run_id, kind, step)",
]


def _journal_mode(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        conn.close()


def test_version_1_store_is_migrated_keeping_every_row(store_path: Path) -> None:
    store_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(store_path)
    for statement in _V1_DDL:
        conn.execute(statement)
    conn.execute("PRAGMA application_id = 1397968207")  # 0x53534D4F, "SSMO"
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO runs VALUES (1, 'old', '2026-01-01T00:00:00.000000+00:00', 'running', '{}', '{\"a\": 1}')")
    conn.execute("INSERT INTO runs VALUES (2, 'done', '2026-01-01T00:00:00.000000+00:00', 'completed', '{}', '{}')")
    conn.executemany("INSERT INTO metrics VALUES (1, ?, 'loss', ?)", [(0, 2.5), (1, None), (2, 1.5)])
    conn.commit()
    conn.close()

    with RunStore(store_path) as s:
        old, done = s.find_run("old"), s.find_run("done")
        steps, values = s.series(1, "loss")
    assert old.meta == {"a": 1} and steps.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(values, [2.5, math.nan, 1.5])
    # Left `running` in January with no heartbeat column: nobody is writing it any more.
    assert (old.recorded_status, old.status, old.heartbeat) == ("running", "stale", None)
    assert done.status == "completed"
    conn = sqlite3.connect(store_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert "heartbeat" in [r[1] for r in conn.execute("PRAGMA table_info(runs)")]
    finally:
        conn.close()


def test_foreign_sqlite_file_keeps_its_journal_mode(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE unrelated (x)")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    assert _journal_mode(path) == "delete"
    with pytest.raises(StoreError, match="not a seismo run store"):
        RunStore(path)
    assert path.read_bytes() == before  # not one byte changed: no WAL switch, no schema
    assert not (tmp_path / "other.db-wal").exists()
    assert _journal_mode(path) == "delete"


def test_empty_sqlite_database_of_another_program_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "blank.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 0")
    conn.execute("VACUUM")  # writes a valid header: an SQLite database with no tables
    conn.close()
    size = path.stat().st_size
    with pytest.raises(StoreError, match="not a seismo run store"):
        RunStore(path)
    assert path.stat().st_size == size


def test_zero_byte_file_is_refused_and_left_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.sqlite"
    path.touch()
    with pytest.raises(StoreError, match="empty file"):
        RunStore(path)
    assert path.stat().st_size == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.sqlite"]


def test_many_openers_of_a_new_store_at_once_share_one_store(store_path: Path) -> None:
    n = 8
    barrier = threading.Barrier(n)
    run_ids: list[int] = []
    errors: list[BaseException] = []

    def open_and_create(i: int) -> None:
        try:
            barrier.wait()
            with RunStore(store_path) as s:
                run_ids.append(s.create_run(f"r{i}"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_and_create, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with RunStore(store_path) as s:
        assert sorted(r.name for r in s.runs()) == sorted(f"r{i}" for i in range(n))
    assert sorted(run_ids) == list(range(1, n + 1))
    assert [p.name for p in store_path.parent.iterdir() if p.name.endswith(".new")] == []  # no temporary file left


# ---------------------------------------------------------------------------
# Run status: heartbeat and stale runs
# ---------------------------------------------------------------------------


def _set_heartbeat(path: Path, run_id: int, value: float) -> None:
    conn = sqlite3.connect(path)
    conn.execute("UPDATE runs SET heartbeat = ? WHERE run_id = ?", (value, run_id))
    conn.commit()
    conn.close()


def _heartbeat(path: Path, run_id: int) -> float:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT heartbeat FROM runs WHERE run_id = ?", (run_id,)).fetchone()[0]
    finally:
        conn.close()


def test_running_run_without_heartbeat_for_a_minute_is_stale(store_path: Path) -> None:
    with RunStore(store_path) as s:
        live, dead, done = s.create_run("live"), s.create_run("dead"), s.create_run("done")
        s.set_status(done, "completed")
    now = time.time()
    _set_heartbeat(store_path, live, now - 30)
    _set_heartbeat(store_path, dead, now - 61)
    _set_heartbeat(store_path, done, now - 3600)
    with RunStore(store_path) as s:
        status = {r.name: (r.status, r.recorded_status) for r in s.runs()}
        assert s.find_run("dead").status == "stale"
    assert status == {"live": ("running", "running"), "dead": ("stale", "running"), "done": ("completed", "completed")}


def test_writes_and_status_changes_refresh_the_heartbeat(store: RunStore, store_path: Path) -> None:
    run = store.create_run("r")
    assert abs(_heartbeat(store_path, run) - time.time()) < 5
    for write in (lambda: store.log_metrics(run, [(0, "x", 1.0)]), lambda: store.set_status(run, "running"), lambda: store.touch(run)):
        _set_heartbeat(store_path, run, 0.0)
        write()
        assert abs(_heartbeat(store_path, run) - time.time()) < 5
    with pytest.raises(StoreError, match="stale"):
        store.set_status(run, "stale")  # derived from the heartbeat, never stored
    with pytest.raises(StoreError, match="no run 99"):
        store.touch(99)


def test_idle_async_writer_keeps_beating_and_stops_when_closed(store_path: Path) -> None:
    with RunStore(store_path) as s:
        run = s.create_run("idle")
    _set_heartbeat(store_path, run, 0.0)
    writer = AsyncWriter(store_path, run, heartbeat_every_s=0.1)
    deadline = time.time() + 10
    while _heartbeat(store_path, run) == 0.0 and time.time() < deadline:
        time.sleep(0.05)
    assert _heartbeat(store_path, run) > time.time() - 5  # beat without any row written
    writer.close()
    _set_heartbeat(store_path, run, 1.0)
    time.sleep(0.4)
    assert _heartbeat(store_path, run) == 1.0  # a closed writer is silent


_BEATING_CHILD = textwrap.dedent(
    """
    import sys, time
    from seismo.store import AsyncWriter, RunStore
    store = RunStore(sys.argv[1])
    run = store.create_run("victim")
    writer = AsyncWriter(sys.argv[1], run, heartbeat_every_s=0.1)
    print("ready", flush=True)
    time.sleep(600)
    """
)


def test_kill_9_leaves_the_run_running_with_a_heartbeat_that_stops(store_path: Path, monkeypatch) -> None:
    store_path.parent.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-c", _BEATING_CHILD, str(store_path)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        first = _heartbeat(store_path, 1)
        deadline = time.time() + 10
        while _heartbeat(store_path, 1) == first and time.time() < deadline:
            time.sleep(0.05)
        assert _heartbeat(store_path, 1) > first  # alive: beating
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
    last = _heartbeat(store_path, 1)
    time.sleep(0.5)
    assert _heartbeat(store_path, 1) == last  # dead: silent
    with RunStore(store_path) as s:
        assert s.find_run(1).status == "running"  # within the minute it may still be alive
        monkeypatch.setattr("seismo.store.records.STALE_AFTER_S", 0.2)
        assert s.find_run(1).status == "stale"
        assert s.find_run(1).recorded_status == "running"


# ---------------------------------------------------------------------------
# Deleting rows for resume, replacing a failed sweep trial
# ---------------------------------------------------------------------------


def test_delete_rows_from_a_step_touches_only_that_run_and_those_steps(store: RunStore) -> None:
    a, b = store.create_run("a"), store.create_run("b")
    for run in (a, b):
        store.log(run, metrics=[(s, n, float(s)) for s in range(10) for n in ("x", "y")],
                  events=[{"step": s, "kind": "k"} for s in (2, 5, 9)] + [{"kind": "no_step"}])
    assert store.delete_rows_from(a, 5) == (10, 2)  # steps 5..9 of two metrics; the events at 5 and 9
    assert store.series(a, "x")[0].tolist() == [0, 1, 2, 3, 4]
    assert store.series(a, "y")[0].tolist() == [0, 1, 2, 3, 4]
    assert [e["step"] for e in store.events(a)] == [2, None]
    assert store.series(b, "x")[0].tolist() == list(range(10))
    assert [e["step"] for e in store.events(b)] == [2, 5, 9, None]
    with pytest.raises(StoreError, match="no run 77"):
        store.delete_rows_from(77, 0)


def test_record_run_replaces_a_run_in_the_same_transaction(store: RunStore) -> None:
    failed = store.record_run("t", status="failed", metrics=[(0, "x", 1.0)], events=[{"kind": "k"}])
    keep = store.record_run("other", metrics=[(0, "x", 2.0)])
    with pytest.raises(StoreError, match="metric name"):
        store.record_run("t", metrics=[(0, "", 1.0)], replaces=failed)  # a bad batch: the failed run must survive
    assert store.find_run(failed).status == "failed"
    new = store.record_run("t", status="completed", metrics=[(0, "x", 3.0)], replaces=failed)
    assert [(r.run_id, r.name, r.status) for r in store.runs()] == [(keep, "other", "completed"), (new, "t", "completed")]
    assert store.series(new, "x")[1].tolist() == [3.0]
    conn = store._connection()
    assert conn.execute("SELECT count(*) FROM metrics WHERE run_id = ?", (failed,)).fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM events WHERE run_id = ?", (failed,)).fetchone()[0] == 0
