"""Run store (SQLite), plots and reports."""

from seismo.report.store import AsyncWriter, RunData, RunInfo, RunStore, StoreError, load_run

__all__ = ["RunStore", "AsyncWriter", "RunData", "RunInfo", "StoreError", "load_run"]
