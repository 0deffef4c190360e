"""The store's on-disk layout: tables, version stamp, migrations, and opening a file safely.

Schema (version 2, stored in ``PRAGMA user_version``)::

    runs(
        run_id      INTEGER PRIMARY KEY,
        name        TEXT NOT NULL,
        created_at  TEXT NOT NULL,       -- ISO 8601, UTC
        status      TEXT NOT NULL,       -- running / completed / diverged / interrupted / failed / ...
        config_json TEXT NOT NULL,       -- JSON object
        meta_json   TEXT NOT NULL,       -- JSON object
        heartbeat   REAL                 -- unix time of the writer's last sign of life (v2)
    )
    metrics(run_id INTEGER NOT NULL REFERENCES runs(run_id), step INTEGER NOT NULL,
            name TEXT NOT NULL, value REAL)               -- NULL encodes NaN
    events(event_id INTEGER PRIMARY KEY AUTOINCREMENT, run_id INTEGER NOT NULL REFERENCES runs(run_id),
           step INTEGER, kind TEXT NOT NULL, severity TEXT, module TEXT, message TEXT,
           evidence_json TEXT NOT NULL, advice TEXT)
    INDEX runs_name(name), metrics_run_name_step(run_id, name, step), events_run_kind_step(run_id, kind, step)

A file is a run store when ``PRAGMA application_id`` is :data:`APPLICATION_ID`. Opening checks
that stamp *before* changing anything, so a foreign SQLite file (or an empty one) is refused and
left exactly as it was, journal mode included. A new store is built in a temporary file and
linked into place in one step, so no process ever sees a half-made store and an empty file at
the path is never one of ours. Older versions are migrated in one transaction on open
(:data:`MIGRATIONS`); a newer version is refused.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

from seismo.store.errors import StoreError

__all__ = ["SCHEMA_VERSION", "APPLICATION_ID", "EVENT_COLUMNS", "RUN_COLUMNS", "MIGRATIONS", "connect"]

#: Version of the on-disk schema, stored in ``PRAGMA user_version``.
SCHEMA_VERSION = 2

#: ``PRAGMA application_id`` marking a file as a seismo run store ("SSMO").
APPLICATION_ID = 0x53534D4F

#: Column order of ``events`` rows as read by :func:`seismo.store.codec.event_from_row`.
EVENT_COLUMNS = "event_id, run_id, step, kind, severity, module, message, evidence_json, advice"

#: Column order of ``runs`` rows as read by :meth:`seismo.store.RunInfo.from_row`.
RUN_COLUMNS = "run_id, name, created_at, status, config_json, meta_json, heartbeat"

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

#: ``MIGRATIONS[v]`` takes a version-``v`` store to version ``v + 1``. A new store is version 1
#: plus every migration, so a created store and a migrated one are the same by construction.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: ("ALTER TABLE runs ADD COLUMN heartbeat REAL",),
}


def connect(path: Path, *, timeout: float, durable: bool) -> sqlite3.Connection:
    """Open (creating if missing) the run store at ``path``: checked, migrated, WAL, configured.

    Raises :class:`StoreError` for anything that is not a seismo store of a version this code
    understands; such a file is not modified.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            _create(path)
        if path.stat().st_size == 0:
            raise StoreError(f"{path} is an empty file, not a seismo run store; remove it or choose another path")
        # isolation_level=None: transactions are issued explicitly (BEGIN / BEGIN IMMEDIATE).
        conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(f"cannot open run store {path}: {exc}") from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        _check_and_migrate(conn, path)  # reads only, unless an older seismo store needs migrating
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
        conn.execute("PRAGMA foreign_keys = ON")
        if str(mode).lower() != "wal":
            raise StoreError(
                f"run store {path} could not be switched to WAL mode (got {mode!r}); "
                "is it on a file system without shared-memory support?"
            )
    except BaseException as exc:
        conn.close()
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"cannot open run store {path}: {exc}") from exc
        raise
    return conn


def _stamp(conn: sqlite3.Connection) -> tuple[int, int]:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    return int(version), int(app_id)


def _check_and_migrate(conn: sqlite3.Connection, path: Path) -> None:
    conn.execute("BEGIN")
    try:
        version, app_id = _stamp(conn)
    finally:
        conn.execute("COMMIT")
    if app_id != APPLICATION_ID:
        raise StoreError(f"{path} is not a seismo run store (application_id={app_id}); it was left unchanged")
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"run store {path} has schema version {version}, but this version of "
            f"seismo only understands up to {SCHEMA_VERSION}; upgrade seismo to read it"
        )
    if version < 1:
        raise StoreError(f"run store {path} has no schema version (user_version=0); the file is damaged")
    if version < SCHEMA_VERSION:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version, _ = _stamp(conn)  # another process may have migrated it meanwhile
            _migrate(conn, version)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def _migrate(conn: sqlite3.Connection, version: int) -> None:
    for v in range(version, SCHEMA_VERSION):
        for statement in MIGRATIONS[v]:
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _create(path: Path) -> None:
    """Build a new, stamped store next to ``path`` and link it into place (never replacing a file).

    ``os.link`` fails if ``path`` exists, so of two processes creating the same store at once one
    wins and the other simply opens the winner's file.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.new")
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")  # persistent: the linked file opens in WAL mode
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA_V1:
                conn.execute(statement)
            _migrate(conn, 1)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute("COMMIT")
        finally:
            conn.close()
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process created the store first: use theirs
        except OSError:  # a file system without hard links: rename (atomic, but may replace a racing creator's file)
            if not path.exists():
                os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
            try:
                leftover.unlink()
            except FileNotFoundError:
                pass
