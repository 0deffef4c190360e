"""SQLite run store: durable, crash-safe storage for metrics and events.

One SQLite file per project directory holds any number of runs (see
:func:`default_store_path`). The file is opened in WAL mode, so a report or
dashboard can read while a training process writes, and every write happens
inside a single transaction, so a crash (even ``kill -9``) loses at most the
batch that was being written and never leaves a half-written batch or a
corrupt file behind.

Schema (version 1, stored in ``PRAGMA user_version``)::

    runs(
        run_id      INTEGER PRIMARY KEY,
        name        TEXT NOT NULL,
        created_at  TEXT NOT NULL,       -- ISO 8601, UTC
        status      TEXT NOT NULL,       -- e.g. running / finished / failed
        config_json TEXT NOT NULL,       -- JSON object
        meta_json   TEXT NOT NULL        -- JSON object
    )
    metrics(
        run_id INTEGER NOT NULL REFERENCES runs(run_id),
        step   INTEGER NOT NULL,
        name   TEXT NOT NULL,
        value  REAL                      -- NULL encodes NaN; +-inf stored as is
    )
    INDEX metrics_run_name_step ON metrics(run_id, name, step)
    events(
        event_id      INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id        INTEGER NOT NULL REFERENCES runs(run_id),
        step          INTEGER,
        kind          TEXT NOT NULL,
        severity      TEXT,
        module        TEXT,
        message       TEXT,
        evidence_json TEXT NOT NULL,     -- JSON object
        advice        TEXT
    )
    INDEX events_run_kind_step ON events(run_id, kind, step)
    INDEX runs_name ON runs(name)

The file is also tagged with ``PRAGMA application_id`` = :data:`APPLICATION_ID`
so that an unrelated SQLite database is rejected instead of being modified.

Three entry points:

* :class:`RunStore` -- a synchronous connection for creating runs, writing
  batches and querying.
* :class:`AsyncWriter` -- moves writes off the training loop's critical path:
  a daemon thread owns its own connection and commits queued batches every
  ``flush_every_s`` seconds. It never raises into the caller; a failure is
  reported once with :class:`StoreWriteWarning` and later writes are dropped.
* :func:`load_run` -- reads a whole run (info, every metric series, events) from
  one consistent snapshot into a :class:`RunData`.
"""

from __future__ import annotations

import enum
import json
import math
import operator
import os
import queue
import sqlite3
import threading
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from time import monotonic
from typing import Any

import numpy as np

from seismo._io import json_default

__all__ = [
    "APPLICATION_ID",
    "SCHEMA_VERSION",
    "AsyncWriter",
    "RunData",
    "RunInfo",
    "RunStore",
    "StoreError",
    "StoreWriteWarning",
    "default_store_path",
    "load_run",
]

#: Version of the on-disk schema, stored in ``PRAGMA user_version``.
SCHEMA_VERSION = 1

#: ``PRAGMA application_id`` marking a file as a seismo run store ("SSMO").
APPLICATION_ID = 0x53534D4F

#: File name used by :func:`default_store_path`.
DEFAULT_STORE_NAME = "seismo.sqlite"

_DEFAULT_TIMEOUT_S = 30.0

_SCHEMA_V1 = (
    """
    CREATE TABLE runs (
        run_id      INTEGER PRIMARY KEY,
        name        TEXT NOT NULL,
        created_at  TEXT NOT NULL,
        status      TEXT NOT NULL,
        config_json TEXT NOT NULL DEFAULT '{}',
        meta_json   TEXT NOT NULL DEFAULT '{}'
    )
    """,
    "CREATE INDEX runs_name ON runs(name)",
    """
    CREATE TABLE metrics (
        run_id INTEGER NOT NULL REFERENCES runs(run_id),
        step   INTEGER NOT NULL,
        name   TEXT NOT NULL,
        value  REAL
    )
    """,
    "CREATE INDEX metrics_run_name_step ON metrics(run_id, name, step)",
    """
    CREATE TABLE events (
        event_id      INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id        INTEGER NOT NULL REFERENCES runs(run_id),
        step          INTEGER,
        kind          TEXT NOT NULL,
        severity      TEXT,
        module        TEXT,
        message       TEXT,
        evidence_json TEXT NOT NULL DEFAULT '{}',
        advice        TEXT
    )
    """,
    "CREATE INDEX events_run_kind_step ON events(run_id, kind, step)",
)

_EVENT_KEYS = frozenset({"step", "kind", "severity", "module", "message", "evidence", "advice"})

_EVENT_COLUMNS = "event_id, run_id, step, kind, severity, module, message, evidence_json, advice"


class StoreError(Exception):
    """Raised for any failure of the run store (I/O, schema, bad input, missing run)."""


class StoreWriteWarning(RuntimeWarning):
    """Emitted (once per writer) when an :class:`AsyncWriter` stops writing."""


def default_store_path(project_dir: str | os.PathLike) -> Path:
    """Return the conventional store location for a project directory.

    Every run of a project shares this single file:
    ``<project_dir>/.seismo/seismo.sqlite``.
    """
    return Path(project_dir) / ".seismo" / DEFAULT_STORE_NAME


# ---------------------------------------------------------------------------
# Value encoding
# ---------------------------------------------------------------------------


def _utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _dump_object(value: Mapping[str, Any] | None, what: str) -> str:
    """Serialise an optional mapping to a JSON object string."""
    if value is None:
        return "{}"
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a dict, got {type(value).__name__}")
    return json.dumps(dict(value), default=json_default, sort_keys=True)


def _load_object(text: str | None) -> dict[str, Any]:
    return json.loads(text) if text else {}


def _encode_value(value: Any) -> float | None:
    """Encode a metric value for the REAL column; NaN becomes NULL."""
    number = float(value)
    return None if math.isnan(number) else number


def _decode_values(raw: list[float | None]) -> np.ndarray:
    """Decode REAL column values to float64, mapping NULL back to NaN."""
    return np.fromiter(
        (math.nan if v is None else v for v in raw), dtype=np.float64, count=len(raw)
    )


def _as_step(step: Any) -> int:
    """Coerce a step to ``int``, rejecting floats and other non-integers."""
    try:
        return operator.index(step)
    except TypeError:
        raise TypeError(f"step must be an integer, got {step!r}") from None


def _optional_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, enum.Enum):
        value = value.value
    return str(value)


def _metric_rows(run_id: int, rows: Iterable[tuple[int, str, float]]) -> Iterator[tuple]:
    """Lazily validate and encode ``(step, name, value)`` rows for executemany."""
    for row in rows:
        step, name, value = row
        if not isinstance(name, str) or not name:
            raise TypeError(f"metric name must be a non-empty str, got {name!r}")
        yield (run_id, _as_step(step), name, _encode_value(value))


def _event_rows(run_id: int, events: Iterable[Mapping[str, Any]]) -> Iterator[tuple]:
    """Lazily validate and encode event dicts for executemany."""
    for event in events:
        if not isinstance(event, Mapping):
            raise TypeError(f"event must be a dict, got {type(event).__name__}")
        unknown = set(event) - _EVENT_KEYS
        if unknown:
            raise ValueError(
                f"unknown event keys {sorted(unknown)}; allowed: {sorted(_EVENT_KEYS)}"
            )
        kind = _optional_text(event.get("kind"))
        if not kind:
            raise ValueError(f"event needs a non-empty 'kind': {dict(event)!r}")
        step = event.get("step")
        yield (
            run_id,
            None if step is None else _as_step(step),
            kind,
            _optional_text(event.get("severity")),
            _optional_text(event.get("module")),
            _optional_text(event.get("message")),
            _dump_object(event.get("evidence"), "event evidence"),
            _optional_text(event.get("advice")),
        )


def _event_from_row(row: tuple) -> dict[str, Any]:
    event_id, run_id, step, kind, severity, module, message, evidence_json, advice = row
    return {
        "event_id": event_id,
        "run_id": run_id,
        "step": step,
        "kind": kind,
        "severity": severity,
        "module": module,
        "message": message,
        "evidence": _load_object(evidence_json),
        "advice": advice,
    }


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RunInfo:
    """One row of the ``runs`` table, with JSON columns decoded."""

    run_id: int
    name: str
    created_at: str
    status: str
    config: dict[str, Any] = field(default_factory=dict, hash=False)
    meta: dict[str, Any] = field(default_factory=dict, hash=False)

    @classmethod
    def _from_row(cls, row: tuple) -> RunInfo:
        run_id, name, created_at, status, config_json, meta_json = row
        return cls(
            run_id=run_id,
            name=name,
            created_at=created_at,
            status=status,
            config=_load_object(config_json),
            meta=_load_object(meta_json),
        )


@dataclass
class RunData:
    """Everything stored for one run, as returned by :func:`load_run`.

    ``metrics`` maps each metric name to ``(steps int64, values float64)``
    sorted by step; ``events`` are in insertion order.
    """

    info: RunInfo
    metrics: dict[str, tuple[np.ndarray, np.ndarray]]
    events: list[dict[str, Any]]

    def series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(steps, values)`` of a metric; KeyError lists what exists."""
        try:
            return self.metrics[name]
        except KeyError:
            available = ", ".join(sorted(self.metrics)) or "<none>"
            raise KeyError(
                f"run {self.info.name!r} (id {self.info.run_id}) has no metric {name!r}; "
                f"available: {available}"
            ) from None


# ---------------------------------------------------------------------------
# Synchronous store
# ---------------------------------------------------------------------------


class RunStore:
    """A connection to a run store file.

    Args:
        path: the SQLite file; its parent directory and the schema are created
            if missing.
        timeout: seconds to wait for another connection's write lock before
            failing (SQLite busy timeout).
        durable: if true (default) every commit is fsync'ed
            (``synchronous=FULL``), so a committed batch survives power loss;
            if false (``synchronous=NORMAL``) a process crash still loses
            nothing committed and the file still cannot be corrupted, but an
            OS crash may roll back the most recent commits.

    A ``RunStore`` must be used from the thread that created it. Methods
    raise :class:`StoreError` on failure; a failed write leaves nothing of
    its batch behind.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        timeout: float = _DEFAULT_TIMEOUT_S,
        durable: bool = True,
    ) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves.
            self._conn: sqlite3.Connection | None = sqlite3.connect(
                self.path, timeout=timeout, isolation_level=None
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open run store {self.path}: {exc}") from exc
        try:
            self._configure(timeout, durable)
            self._ensure_schema()
        except BaseException:
            self.close()
            raise

    # -- connection setup ---------------------------------------------------

    def _configure(self, timeout: float, durable: bool) -> None:
        conn = self._connection()
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open run store {self.path}: {exc}") from exc
        if str(mode).lower() != "wal":
            raise StoreError(
                f"run store {self.path} could not be switched to WAL mode (got {mode!r}); "
                "is it on a file system without shared-memory support?"
            )

    def _ensure_schema(self) -> None:
        """Create the schema in a new file, or validate an existing one.

        An existing store is only read here, so opening it never waits for
        a writer's lock.
        """
        with self._read("read schema version") as conn:
            version, app_id = self._schema_stamp(conn)
        if version == 0:
            with self._write("initialise schema") as conn:
                version, app_id = self._schema_stamp(conn)  # another process may have won
                if version == 0:
                    self._create_schema(conn)
                    return
        if app_id != APPLICATION_ID:
            raise StoreError(f"{self.path} is not a seismo run store (application_id={app_id})")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"run store {self.path} has schema version {version}, but this version of "
                f"seismo only understands up to {SCHEMA_VERSION}; upgrade seismo to read it"
            )

    @staticmethod
    def _schema_stamp(conn: sqlite3.Connection) -> tuple[int, int]:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        return int(version), int(app_id)

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        tables = conn.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
        ).fetchone()[0]
        if tables:
            raise StoreError(f"{self.path} is an SQLite database but not a seismo run store")
        for statement in _SCHEMA_V1:
            conn.execute(statement)
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"run store {self.path} is closed")
        return self._conn

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """Run the body in one ``BEGIN IMMEDIATE`` transaction.

        Commits on success; on any error rolls back everything written in
        the body and raises :class:`StoreError` (bad input and SQLite errors
        alike). ``BEGIN IMMEDIATE`` takes the write lock up front, so a
        concurrent writer is waited for via the busy timeout instead of
        failing on lock upgrade.
        """
        conn = self._connection()
        if conn.in_transaction:
            raise StoreError(f"{what}: cannot write inside snapshot()")
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"{what} failed: {exc}") from exc
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:  # keep the original error; SQLite rolls back on close
                    pass
            if isinstance(exc, (sqlite3.Error, TypeError, ValueError)):
                raise StoreError(f"{what} failed: {exc}") from exc
            raise

    @contextmanager
    def snapshot(self) -> Iterator[RunStore]:
        """Make all reads in the body see one consistent database snapshot.

        Writes by other connections committed meanwhile become visible only
        after the block ends. Writing through this store inside the block
        raises :class:`StoreError`.
        """
        with self._read("snapshot"):
            yield self

    @contextmanager
    def _read(self, what: str) -> Iterator[sqlite3.Connection]:
        """Run queries in a read transaction (joins an enclosing snapshot)."""
        conn = self._connection()
        outermost = not conn.in_transaction
        try:
            if outermost:
                conn.execute("BEGIN")
            try:
                yield conn
            finally:
                if outermost and conn.in_transaction:
                    conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"{what} failed: {exc}") from exc

    # -- runs ---------------------------------------------------------------

    def create_run(
        self,
        name: str,
        config: dict | None = None,
        meta: dict | None = None,
        status: str = "running",
    ) -> int:
        """Insert a new run and return its ``run_id``."""
        if not isinstance(name, str) or not name:
            raise StoreError(f"run name must be a non-empty str, got {name!r}")
        with self._write("create_run") as conn:
            cursor = conn.execute(
                "INSERT INTO runs (name, created_at, status, config_json, meta_json) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    name,
                    _utc_now_iso(),
                    str(status),
                    _dump_object(config, "config"),
                    _dump_object(meta, "meta"),
                ),
            )
            return int(cursor.lastrowid)

    def record_run(
        self,
        name: str,
        config: dict | None = None,
        meta: dict | None = None,
        status: str = "completed",
        metrics: Iterable[tuple[int, str, float]] = (),
        events: Iterable[dict] = (),
    ) -> int:
        """Insert a finished run with all its metrics and events in ONE transaction.

        Used by sweeps: a killed driver leaves either the whole trial or nothing, so a resumed
        sweep never sees a half-written trial.
        """
        if not isinstance(name, str) or not name:
            raise StoreError(f"run name must be a non-empty str, got {name!r}")
        with self._write("record_run") as conn:
            cursor = conn.execute(
                "INSERT INTO runs (name, created_at, status, config_json, meta_json) VALUES (?, ?, ?, ?, ?)",
                (name, _utc_now_iso(), str(status), _dump_object(config, "config"), _dump_object(meta, "meta")),
            )
            run_id = int(cursor.lastrowid)
            conn.executemany(
                "INSERT INTO metrics (run_id, step, name, value) VALUES (?, ?, ?, ?)",
                _metric_rows(run_id, metrics),
            )
            conn.executemany(
                "INSERT INTO events (run_id, step, kind, severity, module, message, "
                "evidence_json, advice) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                _event_rows(run_id, events),
            )
            return run_id

    def set_status(self, run_id: int, status: str) -> None:
        """Set a run's status (e.g. ``"finished"``, ``"failed"``)."""
        with self._write("set_status") as conn:
            cursor = conn.execute(
                "UPDATE runs SET status = ? WHERE run_id = ?", (str(status), run_id)
            )
            if cursor.rowcount == 0:
                raise StoreError(self._missing_run_message(conn, run_id))

    def update_meta(self, run_id: int, meta: dict) -> None:
        """Merge ``meta`` into the run's metadata (top-level keys overwrite)."""
        with self._write("update_meta") as conn:
            row = conn.execute(
                "SELECT meta_json FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
            if row is None:
                raise StoreError(self._missing_run_message(conn, run_id))
            merged = _load_object(row[0])
            merged.update(json.loads(_dump_object(meta, "meta")))
            conn.execute(
                "UPDATE runs SET meta_json = ? WHERE run_id = ?",
                (_dump_object(merged, "meta"), run_id),
            )

    def runs(self) -> list[RunInfo]:
        """All runs, oldest first."""
        with self._read("runs") as conn:
            rows = conn.execute(
                "SELECT run_id, name, created_at, status, config_json, meta_json "
                "FROM runs ORDER BY run_id"
            ).fetchall()
        return [RunInfo._from_row(row) for row in rows]

    def find_run(self, ref: str | int) -> RunInfo:
        """Look a run up by id or by name.

        An ``int`` is a run id. A string is first tried as a run id if it is
        all digits and such a run exists, then as a name; a name that was
        used several times resolves to the latest run with that name.
        """
        query = (
            "SELECT run_id, name, created_at, status, config_json, meta_json FROM runs "
        )
        if isinstance(ref, str):
            run_id = int(ref) if ref.isdecimal() else None
        elif isinstance(ref, bool):
            raise StoreError(f"invalid run reference {ref!r}")
        else:
            try:
                run_id = operator.index(ref)
            except TypeError:
                raise StoreError(f"invalid run reference {ref!r}: use an id or a name") from None
        with self._read("find_run") as conn:
            row = None
            if run_id is not None:
                row = conn.execute(query + "WHERE run_id = ?", (run_id,)).fetchone()
            if row is None and isinstance(ref, str):
                row = conn.execute(
                    query + "WHERE name = ? ORDER BY run_id DESC LIMIT 1", (ref,)
                ).fetchone()
            if row is None:
                raise StoreError(self._missing_run_message(conn, ref))
        return RunInfo._from_row(row)

    def _missing_run_message(self, conn: sqlite3.Connection, ref: Any) -> str:
        latest = conn.execute(
            "SELECT run_id, name FROM runs ORDER BY run_id DESC LIMIT 5"
        ).fetchall()
        if not latest:
            return f"no run {ref!r} in {self.path}: the store has no runs"
        listing = ", ".join(f"{run_id}:{name}" for run_id, name in latest)
        return f"no run {ref!r} in {self.path}; latest runs (id:name): {listing}"

    def _require_run(self, conn: sqlite3.Connection, run_id: int) -> None:
        if conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
            raise StoreError(self._missing_run_message(conn, run_id))

    # -- writes -------------------------------------------------------------

    def log_metrics(self, run_id: int, rows: Iterable[tuple[int, str, float]]) -> None:
        """Append ``(step, name, value)`` rows in one transaction (all or nothing)."""
        self.log(run_id, metrics=rows)

    def log_events(self, run_id: int, events: Iterable[dict]) -> None:
        """Append events in one transaction (all or nothing).

        Each dict may have the keys ``step`` (int), ``kind`` (str, required),
        ``severity``, ``module``, ``message``, ``advice`` (stored as text) and
        ``evidence`` (a JSON-able dict; numpy/torch values are converted).
        Unknown keys are rejected so typos do not silently lose data.
        """
        self.log(run_id, events=events)

    def log(
        self,
        run_id: int,
        metrics: Iterable[tuple[int, str, float]] = (),
        events: Iterable[dict] = (),
    ) -> None:
        """Append metrics and events together in a single transaction."""
        with self._write(f"logging to run {run_id}") as conn:
            self._require_run(conn, run_id)
            conn.executemany(
                "INSERT INTO metrics (run_id, step, name, value) VALUES (?, ?, ?, ?)",
                _metric_rows(run_id, metrics),
            )
            conn.executemany(
                "INSERT INTO events (run_id, step, kind, severity, module, message, "
                "evidence_json, advice) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                _event_rows(run_id, events),
            )

    # -- reads --------------------------------------------------------------

    def metric_names(self, run_id: int) -> list[str]:
        """Sorted names of all metrics logged for a run."""
        with self._read("metric_names") as conn:
            self._require_run(conn, run_id)
            rows = conn.execute(
                "SELECT DISTINCT name FROM metrics WHERE run_id = ? ORDER BY name", (run_id,)
            ).fetchall()
        return [name for (name,) in rows]

    def series(self, run_id: int, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps int64, values float64)`` of one metric, sorted by step.

        Values logged as NaN come back as NaN. A metric that was never logged
        gives two empty arrays.
        """
        with self._read("series") as conn:
            self._require_run(conn, run_id)
            rows = conn.execute(
                "SELECT step, value FROM metrics WHERE run_id = ? AND name = ? "
                "ORDER BY step, rowid",
                (run_id, name),
            ).fetchall()
        steps = np.fromiter((s for s, _ in rows), dtype=np.int64, count=len(rows))
        return steps, _decode_values([v for _, v in rows])

    def all_series(self, run_id: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Every metric of a run as ``{name: (steps, values)}``, in one query."""
        with self._read("all_series") as conn:
            self._require_run(conn, run_id)
            rows = conn.execute(
                "SELECT name, step, value FROM metrics WHERE run_id = ? "
                "ORDER BY name, step, rowid",
                (run_id,),
            ).fetchall()
        result: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        start = 0
        while start < len(rows):
            name = rows[start][0]
            stop = start
            while stop < len(rows) and rows[stop][0] == name:
                stop += 1
            chunk = rows[start:stop]
            steps = np.fromiter((r[1] for r in chunk), dtype=np.int64, count=len(chunk))
            result[name] = (steps, _decode_values([r[2] for r in chunk]))
            start = stop
        return result

    def events(self, run_id: int, kind: str | None = None) -> list[dict]:
        """Events of a run in insertion order, optionally only one ``kind``.

        Each dict has the logged keys (missing ones as ``None``, ``evidence``
        as a dict) plus ``event_id`` and ``run_id``.
        """
        with self._read("events") as conn:
            self._require_run(conn, run_id)
            if kind is None:
                rows = conn.execute(
                    f"SELECT {_EVENT_COLUMNS} FROM events WHERE run_id = ? ORDER BY event_id",
                    (run_id,),
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {_EVENT_COLUMNS} FROM events WHERE run_id = ? AND kind = ? "
                    "ORDER BY event_id",
                    (run_id, kind),
                ).fetchall()
        return [_event_from_row(row) for row in rows]

    # -- lifecycle ----------------------------------------------------------

    def close(self) -> None:
        """Close the connection; idempotent."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else "open"
        return f"RunStore({str(self.path)!r}, {state})"


def load_run(store_path: str | os.PathLike, run: str | int) -> RunData:
    """Read one run (by id or name, see :meth:`RunStore.find_run`) from a store.

    Everything is read from a single snapshot, so it is consistent even while
    another process is writing.
    """
    path = Path(store_path)
    if not path.exists():
        raise StoreError(f"run store {path} does not exist")
    with RunStore(path) as store, store.snapshot():
        info = store.find_run(run)
        return RunData(
            info=info,
            metrics=store.all_series(info.run_id),
            events=store.events(info.run_id),
        )


# ---------------------------------------------------------------------------
# Asynchronous writer
# ---------------------------------------------------------------------------

_METRICS, _EVENTS, _FLUSH, _STOP = "metrics", "events", "flush", "stop"


class _WriterWorker:
    """State and loop of an :class:`AsyncWriter`'s background thread.

    Kept separate from :class:`AsyncWriter` so that the thread holds no
    reference to the writer object, which can then be garbage-collected (and
    closed by its finalizer) normally.
    """

    def __init__(
        self,
        store_path: Path,
        run_id: int,
        flush_every_s: float,
        max_batch_rows: int,
        max_queue: int,
    ) -> None:
        self.store_path = store_path
        self.run_id = run_id
        self.flush_every_s = flush_every_s
        self.max_batch_rows = max_batch_rows
        self.queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=max_queue)
        self.failed = threading.Event()
        self._warned = False
        self._overflow_warned = False
        self._metrics: list[tuple[int, str, float]] = []
        self._events: list[dict] = []

    def fail(self, reason: str) -> None:
        """Stop writing for good and warn once (never raises)."""
        self.failed.set()
        self._metrics.clear()
        self._events.clear()
        if not self._warned:
            self._warned = True
            _warn_safely(
                f"seismo AsyncWriter for run {self.run_id} in {self.store_path} stopped "
                f"writing; further metrics and events are dropped. Cause: {reason}"
            )

    def enqueue(self, kind: str, items: list) -> None:
        """Queue a batch from the caller's thread; drop it (warn once) if full."""
        try:
            self.queue.put_nowait((kind, items))
        except queue.Full:
            if not self._overflow_warned:
                self._overflow_warned = True
                _warn_safely(
                    f"seismo AsyncWriter for run {self.run_id} cannot keep up: "
                    f"{self.queue.maxsize} batches are waiting, so new ones are dropped "
                    "until it catches up"
                )

    def run(self) -> None:
        """Thread body: own connection, batch queued items, commit periodically."""
        store: RunStore | None = None
        try:
            store = RunStore(self.store_path)
        except Exception as exc:  # noqa: BLE001 - must never propagate
            self.fail(f"cannot open store: {exc}")
        try:
            self._loop(store)
        except Exception as exc:  # noqa: BLE001 - defensive: report, never propagate
            self.fail(f"writer thread crashed: {exc!r}")
        finally:
            if store is not None:
                try:
                    store.close()
                except Exception:  # noqa: BLE001
                    pass

    def _loop(self, store: RunStore | None) -> None:
        deadline: float | None = None  # when the pending batch must be committed
        while True:
            timeout = None if deadline is None else max(0.0, deadline - monotonic())
            try:
                kind, payload = self.queue.get(timeout=timeout)
            except queue.Empty:
                self._commit(store)
                deadline = None
                continue
            if kind in (_METRICS, _EVENTS):
                if not self.failed.is_set():
                    (self._metrics if kind == _METRICS else self._events).extend(payload)
                    if deadline is None:
                        deadline = monotonic() + self.flush_every_s
            else:  # _FLUSH or _STOP: commit everything received so far
                self._commit(store)
                deadline = None
                payload.set()
                if kind == _STOP:
                    return
            pending = len(self._metrics) + len(self._events)
            if pending >= self.max_batch_rows or (
                deadline is not None and monotonic() >= deadline
            ):
                self._commit(store)
                deadline = None

    def _commit(self, store: RunStore | None) -> None:
        if self.failed.is_set() or store is None or not (self._metrics or self._events):
            self._metrics.clear()
            self._events.clear()
            return
        try:
            store.log(self.run_id, metrics=self._metrics, events=self._events)
        except Exception as exc:  # noqa: BLE001 - must never propagate
            self.fail(str(exc))
        finally:
            self._metrics.clear()
            self._events.clear()


def _warn_safely(message: str) -> None:
    """Emit a :class:`StoreWriteWarning`, even if warnings are set to raise."""
    try:
        warnings.warn(message, StoreWriteWarning, stacklevel=3)
    except Exception:  # noqa: BLE001 - e.g. ``-W error``: never raise into training
        pass


def _stop_worker(worker: _WriterWorker, thread: threading.Thread) -> None:
    """Ask the worker to commit what it has and exit, then wait for it."""
    if thread.is_alive():
        done = threading.Event()
        worker.queue.put((_STOP, done))
        thread.join()


class AsyncWriter:
    """Write metrics and events from a background thread.

    ``put_metrics``/``put_events`` only append to an in-memory queue, so the
    training loop never waits on disk. A daemon thread with its own SQLite
    connection commits the queued rows in one transaction at most every
    ``flush_every_s`` seconds (sooner once ``max_batch_rows`` rows are
    pending). A crash therefore loses at most the rows queued since the
    last commit.

    Nothing here raises into the caller: if opening the store or a commit
    fails, a :class:`StoreWriteWarning` is emitted once and every later write
    is dropped. If more than ``max_queue`` batches are waiting (the writer
    cannot keep up), new batches are dropped with a one-time warning rather
    than letting memory grow without bound.

    ``close()`` (also run at interpreter exit and on garbage collection)
    commits what is pending; it is idempotent.

    Throughput note: Python's ``sqlite3`` releases the GIL around every row
    it inserts, so a writer thread competes with a Python-bound training
    loop. At typical logging rates (a few thousand rows per second) the
    cost is small; if it shows up in a profile, log every N steps.
    """

    def __init__(
        self,
        store_path: str | os.PathLike,
        run_id: int,
        flush_every_s: float = 1.0,
        *,
        max_batch_rows: int = 50_000,
        max_queue: int = 10_000,
    ) -> None:
        if flush_every_s < 0:
            raise ValueError(f"flush_every_s must be >= 0, got {flush_every_s}")
        if max_batch_rows < 1 or max_queue < 1:
            raise ValueError("max_batch_rows and max_queue must be >= 1")
        self._worker = _WriterWorker(
            Path(store_path), run_id, flush_every_s, max_batch_rows, max_queue
        )
        self._thread = threading.Thread(
            target=self._worker.run, name=f"seismo-store-writer-{run_id}", daemon=True
        )
        self._closed = False
        self._thread.start()
        self._finalizer = weakref.finalize(self, _stop_worker, self._worker, self._thread)

    @property
    def failed(self) -> bool:
        """True once the writer has stopped writing because of an error."""
        return self._worker.failed.is_set()

    def put_metrics(self, rows: list[tuple[int, str, float]]) -> None:
        """Queue ``(step, name, value)`` rows; returns immediately."""
        if rows and not self._closed and not self._worker.failed.is_set():
            self._worker.enqueue(_METRICS, list(rows))

    def put_events(self, events: list[dict]) -> None:
        """Queue event dicts (see :meth:`RunStore.log_events`); returns immediately."""
        if events and not self._closed and not self._worker.failed.is_set():
            self._worker.enqueue(_EVENTS, list(events))

    def flush(self) -> None:
        """Block until everything queued so far is committed (or dropped on failure)."""
        if self._closed:
            return
        done = threading.Event()
        self._worker.queue.put((_FLUSH, done))
        while not done.wait(timeout=0.1):
            if not self._thread.is_alive():  # defensive: the loop never dies silently
                return

    def close(self) -> None:
        """Commit everything queued and stop the thread; idempotent."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> AsyncWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
