"""``RunStore``: a synchronous connection to a run store file, and ``load_run``.

Every write is one transaction (all of a batch or none of it); reads can be grouped in one
consistent :meth:`RunStore.snapshot`. The file is in WAL mode, so readers and one writer at a
time proceed together, and writers wait for each other (busy timeout) instead of failing.
"""

from __future__ import annotations

import json
import math
import operator
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from seismo.store.codec import (
    decode_values,
    dump_object,
    event_from_row,
    event_rows,
    load_object,
    metric_rows,
    utc_now_iso,
)
from seismo.store.errors import StoreError
from seismo.store.records import RUNNING, STALE, RunData, RunInfo
from seismo.store.schema import EVENT_COLUMNS, RUN_COLUMNS, connect

__all__ = ["RunStore", "load_run", "default_store_path", "DEFAULT_STORE_NAME"]

#: File name used by :func:`default_store_path`.
DEFAULT_STORE_NAME = "seismo.sqlite"

_DEFAULT_TIMEOUT_S = 30.0

_INSERT_RUN = "INSERT INTO runs (name, created_at, status, config_json, meta_json, heartbeat) VALUES (?, ?, ?, ?, ?, ?)"
_INSERT_METRIC = "INSERT INTO metrics (run_id, step, name, value) VALUES (?, ?, ?, ?)"
_INSERT_EVENT = (
    "INSERT INTO events (run_id, step, kind, severity, module, message, evidence_json, advice) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


def default_store_path(project_dir: str | os.PathLike) -> Path:
    """Return the conventional store location for a project directory.

    Every run of a project shares this single file: ``<project_dir>/.seismo/seismo.sqlite``.
    """
    return Path(project_dir) / ".seismo" / DEFAULT_STORE_NAME


def _status_text(status: Any) -> str:
    status = str(status)
    if not status or status == STALE:
        raise StoreError(f"run status must be a non-empty str other than {STALE!r} (which is derived), got {status!r}")
    return status


class RunStore:
    """A connection to a run store file.

    Args:
        path: the SQLite file; its parent directory and the schema are created if missing.
            An existing file must be a seismo store (it is migrated to the current schema if
            older); anything else, an empty file included, is refused and left unchanged.
        timeout: seconds to wait for another connection's write lock before failing (SQLite
            busy timeout).
        durable: if true (default) every commit is fsync'ed (``synchronous=FULL``), so a
            committed batch survives power loss; if false (``synchronous=NORMAL``) a process
            crash still loses nothing committed and the file still cannot be corrupted, but an
            OS crash may roll back the most recent commits.

    A ``RunStore`` must be used from the thread that created it. Methods raise
    :class:`StoreError` on failure; a failed write leaves nothing of its batch behind.
    """

    def __init__(self, path: str | os.PathLike, *, timeout: float = _DEFAULT_TIMEOUT_S, durable: bool = True) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = connect(self.path, timeout=timeout, durable=durable)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"run store {self.path} is closed")
        return self._conn

    # -- transactions -------------------------------------------------------

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """Run the body in one ``BEGIN IMMEDIATE`` transaction.

        Commits on success; on any error rolls back everything written in the body and raises
        :class:`StoreError` (bad input and SQLite errors alike). ``BEGIN IMMEDIATE`` takes the
        write lock up front, so a concurrent writer is waited for via the busy timeout instead
        of failing on lock upgrade.
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
                except sqlite3.Error:  # keep the original error; SQLite rolls back on close anyway
                    pass
            if isinstance(exc, (sqlite3.Error, TypeError, ValueError)):
                raise StoreError(f"{what} failed: {exc}") from exc
            raise

    @contextmanager
    def snapshot(self) -> Iterator[RunStore]:
        """Make all reads in the body see one consistent database snapshot.

        Writes by other connections committed meanwhile become visible only after the block
        ends. Writing through this store inside the block raises :class:`StoreError`.
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

    # -- shared statements ----------------------------------------------------

    @staticmethod
    def _insert_run(conn: sqlite3.Connection, name: str, config: dict | None, meta: dict | None, status: str) -> int:
        if not isinstance(name, str) or not name:
            raise StoreError(f"run name must be a non-empty str, got {name!r}")
        cursor = conn.execute(
            _INSERT_RUN,
            (name, utc_now_iso(), _status_text(status), dump_object(config, "config"), dump_object(meta, "meta"), time.time()),
        )
        return int(cursor.lastrowid)

    @staticmethod
    def _insert_rows(conn: sqlite3.Connection, run_id: int, metrics: Iterable, events: Iterable) -> None:
        conn.executemany(_INSERT_METRIC, metric_rows(run_id, metrics))
        conn.executemany(_INSERT_EVENT, event_rows(run_id, events))

    def _beat(self, conn: sqlite3.Connection, run_id: int) -> None:
        """Refresh the run's heartbeat; raise if the run does not exist."""
        if conn.execute("UPDATE runs SET heartbeat = ? WHERE run_id = ?", (time.time(), run_id)).rowcount == 0:
            raise StoreError(self._missing_run_message(conn, run_id))

    # -- runs ---------------------------------------------------------------

    def create_run(self, name: str, config: dict | None = None, meta: dict | None = None, status: str = RUNNING) -> int:
        """Insert a new run (heartbeat: now) and return its ``run_id``."""
        with self._write("create_run") as conn:
            return self._insert_run(conn, name, config, meta, status)

    def record_run(
        self,
        name: str,
        config: dict | None = None,
        meta: dict | None = None,
        status: str = "completed",
        metrics: Iterable[tuple[int, str, float]] = (),
        events: Iterable[dict] = (),
        *,
        replaces: int | None = None,
    ) -> int:
        """Insert a finished run with all its metrics and events in ONE transaction.

        Used by sweeps: a killed driver leaves either the whole trial or nothing, so a resumed
        sweep never sees a half-written trial. ``replaces`` (a run id) is deleted in the same
        transaction: a retried trial takes the place of its failed attempt.
        """
        with self._write("record_run") as conn:
            if replaces is not None:
                self._delete_run(conn, replaces)
            run_id = self._insert_run(conn, name, config, meta, status)
            self._insert_rows(conn, run_id, metrics, events)
            return run_id

    def _delete_run(self, conn: sqlite3.Connection, run_id: int) -> None:
        self._require_run(conn, run_id)
        conn.execute("DELETE FROM metrics WHERE run_id = ?", (run_id,))
        conn.execute("DELETE FROM events WHERE run_id = ?", (run_id,))
        conn.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))

    def delete_run(self, run_id: int) -> None:
        """Delete a run with all its metrics and events (one transaction)."""
        with self._write("delete_run") as conn:
            self._delete_run(conn, run_id)

    def delete_rows_from(self, run_id: int, step: int) -> tuple[int, int]:
        """Delete the run's metric rows and events at ``step`` and later; return how many of each.

        A run resumed from a checkpoint taken after ``step`` steps recomputes those steps, so
        their rows, committed before a crash, would otherwise be stored twice.
        """
        with self._write("delete_rows_from") as conn:
            self._require_run(conn, run_id)
            n_metrics = conn.execute("DELETE FROM metrics WHERE run_id = ? AND step >= ?", (run_id, int(step))).rowcount
            n_events = conn.execute("DELETE FROM events WHERE run_id = ? AND step >= ?", (run_id, int(step))).rowcount
        return n_metrics, n_events

    def set_status(self, run_id: int, status: str) -> None:
        """Set a run's status (``completed``, ``diverged``, ``interrupted``, ``failed``, ``running``...)."""
        with self._write("set_status") as conn:
            cursor = conn.execute(
                "UPDATE runs SET status = ?, heartbeat = ? WHERE run_id = ?", (_status_text(status), time.time(), run_id)
            )
            if cursor.rowcount == 0:
                raise StoreError(self._missing_run_message(conn, run_id))

    def touch(self, run_id: int) -> None:
        """Record a heartbeat: the run's writer is alive (see :data:`seismo.store.STALE_AFTER_S`)."""
        with self._write("heartbeat") as conn:
            self._beat(conn, run_id)

    def update_meta(self, run_id: int, meta: dict) -> None:
        """Merge ``meta`` into the run's metadata (top-level keys overwrite)."""
        with self._write("update_meta") as conn:
            row = conn.execute("SELECT meta_json FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise StoreError(self._missing_run_message(conn, run_id))
            merged = load_object(row[0])
            merged.update(json.loads(dump_object(meta, "meta")))
            conn.execute("UPDATE runs SET meta_json = ? WHERE run_id = ?", (dump_object(merged, "meta"), run_id))

    def runs(self) -> list[RunInfo]:
        """All runs, oldest first."""
        with self._read("runs") as conn:
            rows = conn.execute(f"SELECT {RUN_COLUMNS} FROM runs ORDER BY run_id").fetchall()
        now = time.time()
        return [RunInfo.from_row(row, now) for row in rows]

    def find_run(self, ref: str | int) -> RunInfo:
        """Look a run up by id or by name.

        An ``int`` is a run id. A string is first tried as a run id if it is all digits and
        such a run exists, then as a name; a name that was used several times resolves to the
        latest run with that name.
        """
        query = f"SELECT {RUN_COLUMNS} FROM runs "
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
                row = conn.execute(query + "WHERE name = ? ORDER BY run_id DESC LIMIT 1", (ref,)).fetchone()
            if row is None:
                raise StoreError(self._missing_run_message(conn, ref))
        return RunInfo.from_row(row)

    def _missing_run_message(self, conn: sqlite3.Connection, ref: Any) -> str:
        latest = conn.execute("SELECT run_id, name FROM runs ORDER BY run_id DESC LIMIT 5").fetchall()
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

        Each dict may have the keys ``step`` (int), ``kind`` (str, required), ``severity``,
        ``module``, ``message``, ``advice`` (stored as text) and ``evidence`` (a JSON-able dict;
        numpy/torch values are converted). Unknown keys are rejected so typos do not silently
        lose data.
        """
        self.log(run_id, events=events)

    def log(self, run_id: int, metrics: Iterable[tuple[int, str, float]] = (), events: Iterable[dict] = ()) -> None:
        """Append metrics and events together in a single transaction (which also refreshes the heartbeat)."""
        with self._write(f"logging to run {run_id}") as conn:
            self._beat(conn, run_id)
            self._insert_rows(conn, run_id, metrics, events)

    # -- reads --------------------------------------------------------------

    def metric_names(self, run_id: int) -> list[str]:
        """Sorted names of all metrics logged for a run."""
        with self._read("metric_names") as conn:
            self._require_run(conn, run_id)
            rows = conn.execute("SELECT DISTINCT name FROM metrics WHERE run_id = ? ORDER BY name", (run_id,)).fetchall()
        return [name for (name,) in rows]

    def series(self, run_id: int, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps int64, values float64)`` of one metric, sorted by step.

        Values logged as NaN come back as NaN. A metric that was never logged gives two empty
        arrays.
        """
        with self._read("series") as conn:
            self._require_run(conn, run_id)
            rows = conn.execute(
                "SELECT step, value FROM metrics WHERE run_id = ? AND name = ? ORDER BY step, rowid", (run_id, name)
            ).fetchall()
        steps = np.fromiter((s for s, _ in rows), dtype=np.int64, count=len(rows))
        return steps, decode_values([v for _, v in rows])

    def metric_max(self, run_id: int, prefix: str) -> float:
        """The largest value of every metric whose name starts with ``prefix`` (NaN values are
        skipped; ``nan`` if there is none)."""
        with self._read("metric_max") as conn:
            self._require_run(conn, run_id)
            (value,) = conn.execute(
                "SELECT max(value) FROM metrics WHERE run_id = ? AND substr(name, 1, ?) = ?", (run_id, len(prefix), prefix)
            ).fetchone()
        return math.nan if value is None else float(value)

    def all_series(self, run_id: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Every metric of a run as ``{name: (steps, values)}``, in one query."""
        with self._read("all_series") as conn:
            self._require_run(conn, run_id)
            rows = conn.execute(
                "SELECT name, step, value FROM metrics WHERE run_id = ? ORDER BY name, step, rowid", (run_id,)
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
            result[name] = (steps, decode_values([r[2] for r in chunk]))
            start = stop
        return result

    def events(self, run_id: int, kind: str | None = None) -> list[dict]:
        """Events of a run in insertion order, optionally only one ``kind``.

        Each dict has the logged keys (missing ones as ``None``, ``evidence`` as a dict) plus
        ``event_id`` and ``run_id``.
        """
        with self._read("events") as conn:
            self._require_run(conn, run_id)
            if kind is None:
                rows = conn.execute(
                    f"SELECT {EVENT_COLUMNS} FROM events WHERE run_id = ? ORDER BY event_id", (run_id,)
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {EVENT_COLUMNS} FROM events WHERE run_id = ? AND kind = ? ORDER BY event_id", (run_id, kind)
                ).fetchall()
        return [event_from_row(row) for row in rows]

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

    Everything is read from a single snapshot, so it is consistent even while another process
    is writing.
    """
    path = Path(store_path)
    if not path.exists():
        raise StoreError(f"run store {path} does not exist")
    with RunStore(path) as store, store.snapshot():
        info = store.find_run(run)
        return RunData(info=info, metrics=store.all_series(info.run_id), events=store.events(info.run_id))
