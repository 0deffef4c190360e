"""``AsyncWriter``: moves store writes off the training loop's critical path, and keeps the heartbeat.

A daemon thread owns its own connection and commits queued batches every ``flush_every_s``
seconds. It never raises into the caller: a failure is reported once with
:class:`~seismo.store.StoreWriteWarning` and later writes are dropped. While it is open it also
refreshes the run's heartbeat at least every ``heartbeat_every_s`` seconds (each commit counts),
so a run whose process was killed shows as ``stale`` (see :mod:`seismo.store.records`).
"""

from __future__ import annotations

import os
import queue
import threading
import warnings
import weakref
from pathlib import Path
from time import monotonic
from typing import Any

from seismo.store.errors import StoreWriteWarning
from seismo.store.run_store import RunStore

__all__ = ["AsyncWriter", "HEARTBEAT_EVERY_S"]

#: Default seconds between heartbeats of an idle writer (well under ``STALE_AFTER_S``).
HEARTBEAT_EVERY_S = 5.0

_METRICS, _EVENTS, _FLUSH, _STOP = "metrics", "events", "flush", "stop"


class _WriterWorker:
    """State and loop of an :class:`AsyncWriter`'s background thread.

    Kept separate from :class:`AsyncWriter` so that the thread holds no reference to the writer
    object, which can then be garbage-collected (and closed by its finalizer) normally.
    """

    def __init__(
        self, store_path: Path, run_id: int, flush_every_s: float, max_batch_rows: int, max_queue: int, heartbeat_every_s: float
    ) -> None:
        self.store_path = store_path
        self.run_id = run_id
        self.flush_every_s = flush_every_s
        self.max_batch_rows = max_batch_rows
        self.heartbeat_every_s = heartbeat_every_s
        self.queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=max_queue)
        self.failed = threading.Event()
        self._warned = False
        self._overflow_warned = False
        self._metrics: list[tuple[int, str, float]] = []
        self._events: list[dict] = []
        self._last_beat = monotonic()

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
        """Thread body: own connection, batch queued items, commit periodically, beat."""
        store: RunStore | None = None
        try:
            store = RunStore(self.store_path)
        except Exception as exc:  # noqa: BLE001 - must never propagate; fail() warns once
            self.fail(f"cannot open store: {exc}")
        try:
            self._loop(store)
        except Exception as exc:  # noqa: BLE001 - defensive: fail() reports it once, never propagates
            self.fail(f"writer thread crashed: {exc!r}")
        finally:
            if store is not None:
                try:
                    store.close()
                except Exception as exc:  # noqa: BLE001 - closing a read-only leftover; warn, never raise
                    _warn_safely(f"seismo AsyncWriter for run {self.run_id}: closing the store failed: {exc}")

    def _timeout(self, deadline: float | None) -> float | None:
        waits = [] if deadline is None else [deadline - monotonic()]
        if self.heartbeat_every_s > 0 and not self.failed.is_set():
            waits.append(self._last_beat + self.heartbeat_every_s - monotonic())
        return max(0.0, min(waits)) if waits else None

    def _loop(self, store: RunStore | None) -> None:
        deadline: float | None = None  # when the pending batch must be committed
        while True:
            try:
                kind, payload = self.queue.get(timeout=self._timeout(deadline))
            except queue.Empty:
                if deadline is not None and monotonic() >= deadline:
                    self._commit(store)
                    deadline = None
                self._beat_if_due(store)
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
            if pending >= self.max_batch_rows or (deadline is not None and monotonic() >= deadline):
                self._commit(store)
                deadline = None
            self._beat_if_due(store)

    def _beat_if_due(self, store: RunStore | None) -> None:
        if self.heartbeat_every_s <= 0 or self.failed.is_set() or store is None:
            return
        if monotonic() - self._last_beat < self.heartbeat_every_s:
            return
        self._last_beat = monotonic()
        try:
            store.touch(self.run_id)
        except Exception as exc:  # noqa: BLE001 - must never propagate; fail() warns once
            self.fail(f"heartbeat failed: {exc}")

    def _commit(self, store: RunStore | None) -> None:
        if self.failed.is_set() or store is None or not (self._metrics or self._events):
            self._metrics.clear()
            self._events.clear()
            return
        try:
            store.log(self.run_id, metrics=self._metrics, events=self._events)  # also refreshes the heartbeat
            self._last_beat = monotonic()
        except Exception as exc:  # noqa: BLE001 - must never propagate; fail() warns once
            self.fail(str(exc))
        finally:
            self._metrics.clear()
            self._events.clear()


def _warn_safely(message: str) -> None:
    """Emit a :class:`StoreWriteWarning`, even if warnings are set to raise."""
    try:
        warnings.warn(message, StoreWriteWarning, stacklevel=3)
    except Exception:  # noqa: BLE001 - e.g. ``-W error``: a warning must never raise into training
        pass


def _stop_worker(worker: _WriterWorker, thread: threading.Thread) -> None:
    """Ask the worker to commit what it has and exit, then wait for it."""
    if thread.is_alive():
        done = threading.Event()
        worker.queue.put((_STOP, done))
        thread.join()


class AsyncWriter:
    """Write metrics and events from a background thread.

    ``put_metrics``/``put_events`` only append to an in-memory queue, so the training loop
    never waits on disk. A daemon thread with its own SQLite connection commits the queued rows
    in one transaction at most every ``flush_every_s`` seconds (sooner once ``max_batch_rows``
    rows are pending). A crash therefore loses at most the rows queued since the last commit.
    The same thread refreshes the run's heartbeat at least every ``heartbeat_every_s`` seconds
    while the writer is open (0 turns the idle heartbeat off; commits still beat).

    Nothing here raises into the caller: if opening the store or a commit fails, a
    :class:`StoreWriteWarning` is emitted once and every later write is dropped. If more than
    ``max_queue`` batches are waiting (the writer cannot keep up), new batches are dropped with
    a one-time warning rather than letting memory grow without bound.

    ``flush()`` blocks until everything queued so far is committed. ``close()`` (also run at
    interpreter exit and on garbage collection) commits what is pending; it is idempotent.

    Throughput note: Python's ``sqlite3`` releases the GIL around every row it inserts, so a
    writer thread competes with a Python-bound training loop. At typical logging rates (a few
    thousand rows per second) the cost is small; if it shows up in a profile, log every N steps.
    """

    def __init__(
        self,
        store_path: str | os.PathLike,
        run_id: int,
        flush_every_s: float = 1.0,
        *,
        max_batch_rows: int = 50_000,
        max_queue: int = 10_000,
        heartbeat_every_s: float = HEARTBEAT_EVERY_S,
    ) -> None:
        if flush_every_s < 0:
            raise ValueError(f"flush_every_s must be >= 0, got {flush_every_s}")
        if max_batch_rows < 1 or max_queue < 1:
            raise ValueError("max_batch_rows and max_queue must be >= 1")
        if not heartbeat_every_s >= 0:
            raise ValueError(f"heartbeat_every_s must be >= 0, got {heartbeat_every_s}")
        self._worker = _WriterWorker(Path(store_path), run_id, flush_every_s, max_batch_rows, max_queue, heartbeat_every_s)
        self._thread = threading.Thread(target=self._worker.run, name=f"seismo-store-writer-{run_id}", daemon=True)
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
