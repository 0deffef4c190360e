"""Old import path of the run store (``seismo.store.store``): re-exports :mod:`seismo.store` for one release."""

from seismo.store import (  # noqa: F401 - re-exports
    APPLICATION_ID,
    DEFAULT_STORE_NAME,
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
