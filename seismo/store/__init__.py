"""The run store: SQLite schema, ``RunStore``, the background writer and ``load_run``.

The bottom layer of seismo: everything that records or reads runs goes through it.
See docs/RUN_STORE.md.
"""

from seismo.store.store import (
    DEFAULT_STORE_NAME,
    AsyncWriter,
    RunData,
    RunInfo,
    RunStore,
    StoreError,
    default_store_path,
    load_run,
)

__all__ = ["RunStore", "AsyncWriter", "RunData", "RunInfo", "StoreError", "load_run", "default_store_path", "DEFAULT_STORE_NAME"]
