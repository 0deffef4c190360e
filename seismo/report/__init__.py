"""Plots and reports, read from the run store.

``RunStore`` and ``load_run`` live in :mod:`seismo.store`; they are re-exported here for one
release so that ``seismo.report.load_run`` keeps working.
"""

from seismo.store import AsyncWriter, RunData, RunInfo, RunStore, StoreError, load_run

__all__ = ["RunStore", "AsyncWriter", "RunData", "RunInfo", "StoreError", "load_run"]
