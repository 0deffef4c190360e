"""The run store: SQLite schema, ``RunStore``, the background writer and ``load_run``.

The bottom layer of seismo: everything that records or reads runs goes through it. One module
per job: :mod:`~seismo.store.schema` (tables, version, migrations, opening a file safely),
:mod:`~seismo.store.codec` (values to columns and back), :mod:`~seismo.store.records`
(``RunInfo``, ``RunData``, run status), :mod:`~seismo.store.run_store` (``RunStore``,
``load_run``), :mod:`~seismo.store.writer` (``AsyncWriter`` and the heartbeat).
See docs/RUN_STORE.md.
"""

from seismo.store.errors import StoreError, StoreWriteWarning
from seismo.store.records import (
    COMPLETED,
    DIVERGED,
    FAILED,
    INTERRUPTED,
    RUNNING,
    STALE,
    STALE_AFTER_S,
    RunData,
    RunInfo,
)
from seismo.store.run_store import DEFAULT_STORE_NAME, RunStore, default_store_path, load_run
from seismo.store.schema import APPLICATION_ID, SCHEMA_VERSION
from seismo.store.writer import HEARTBEAT_EVERY_S, AsyncWriter

__all__ = [
    "RunStore",
    "AsyncWriter",
    "RunData",
    "RunInfo",
    "StoreError",
    "StoreWriteWarning",
    "load_run",
    "default_store_path",
    "DEFAULT_STORE_NAME",
    "SCHEMA_VERSION",
    "APPLICATION_ID",
    "HEARTBEAT_EVERY_S",
    "STALE_AFTER_S",
    "RUNNING",
    "COMPLETED",
    "DIVERGED",
    "INTERRUPTED",
    "FAILED",
    "STALE",
]
