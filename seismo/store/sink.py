"""``StoreSink``: the run store as a record and event sink.

    monitor = Monitor(model, optimizer, sinks=[StoreSink("runs/seismo.sqlite", run_name="exp1")])

``store="..."`` on the Monitor is shorthand for this. Rows go through an :class:`AsyncWriter`
(a background thread; the training loop never waits on disk), so ``write_records`` and
``write_events`` return at once. The sink owns the run's status: ``running`` from construction,
then whatever :meth:`StoreSink.set_status` says (the Monitor sets ``completed`` or ``failed`` when
it closes).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from seismo.events import Event, Record
from seismo.store.records import RUNNING
from seismo.store.run_store import RunStore
from seismo.store.writer import AsyncWriter

__all__ = ["StoreSink"]


class StoreSink:
    """Write records and events of one run to a SQLite run store.

    Args:
        store_or_path: a :class:`RunStore` or the path of its file (created if missing).
        run_name: name of a new run.
        config / meta: JSON-able dicts stored with a new run.
        run_id: continue this stored run (a resumed run) instead of creating one; its status is
            set back to ``running``.
    """

    name = "store"

    def __init__(
        self,
        store_or_path: RunStore | str | os.PathLike,
        run_name: str | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        run_id: int | None = None,
    ):
        self.store = store_or_path if isinstance(store_or_path, RunStore) else RunStore(store_or_path)
        if run_id is not None:  # resuming: keep writing into the same run
            self.store.find_run(int(run_id))
            self.store.set_status(int(run_id), RUNNING)
            self.run_id = int(run_id)
        else:
            self.run_id = self.store.create_run(run_name or "run", config=dict(config or {}), meta=dict(meta or {}))
        self._writer: AsyncWriter | None = AsyncWriter(self.store.path, self.run_id)

    def write_records(self, records: Sequence[Record]) -> None:
        if self._writer is not None:
            self._writer.put_metrics([(step, name, value) for step, values in records for name, value in values.items()])

    def write_events(self, events: Sequence[Event | Mapping[str, Any]]) -> None:
        if self._writer is not None and events:
            self._writer.put_events([e.to_dict() if isinstance(e, Event) else dict(e) for e in events])

    def flush(self) -> None:
        """Block until everything written so far is committed."""
        if self._writer is not None:
            self._writer.flush()

    def set_status(self, status: str, meta: Mapping[str, Any] | None = None) -> None:
        """Commit what is pending, then set the run's status (and merge ``meta`` into its metadata)."""
        self.flush()
        self.store.set_status(self.run_id, status)
        if meta:
            self.store.update_meta(self.run_id, dict(meta))

    def close(self) -> None:
        """Commit everything and stop the writer thread; idempotent. The status is left as set."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
