"""Reports read from the run store: the HTML report (:func:`write_report`), the live terminal
view (:mod:`seismo.report.watch`) and figures (the ``plot`` extra, matplotlib without pyplot).

``RunStore`` and ``load_run`` live in :mod:`seismo.store`; they are re-exported here for one
release so that ``seismo.report.load_run`` keeps working.
"""

from seismo.report.html import write_report
from seismo.store import AsyncWriter, RunData, RunInfo, RunStore, StoreError, load_run

__all__ = ["write_report", "RunStore", "AsyncWriter", "RunData", "RunInfo", "StoreError", "load_run"]
