"""Where the Guard's events go: ``guard.events``, the ``seismo.guard`` logger, event sinks, a
Monitor's run, a run store, an ``on_event`` callable. A sink that fails is switched off with one
warning; reporting never stops training. Only rank 0 reports.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Callable, Sequence

from seismo.errors import ConfigError
from seismo.events import Event, EventSink
from seismo.mitigate.guard.errors import GuardWarning
from seismo.store import RunStore

__all__ = ["EventFanout", "RunStoreEvents", "logger"]

logger = logging.getLogger("seismo.guard")
_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.ERROR}


class RunStoreEvents:
    """An :class:`~seismo.events.EventSink` writing to one run of a run store (a path or a
    ``RunStore``; a store opened from a path is closed by :meth:`close`)."""

    def __init__(self, store: str | os.PathLike | RunStore, run_id: int):
        self._arg = store
        self._store: RunStore | None = store if isinstance(store, RunStore) else None
        self.run_id = int(run_id)

    def write_events(self, events: Sequence[Event]) -> None:
        if self._store is None:
            self._store = RunStore(self._arg)
        self._store.log_events(self.run_id, [e.to_dict() for e in events])

    def close(self) -> None:
        if self._store is not None and self._store is not self._arg:
            self._store.close()
            self._store = None


class _MonitorEvents:
    """A Monitor's event path: its ``write_events`` if it has one, else its store writer and
    ``monitor.events`` list."""

    def __init__(self, monitor: Any):
        self.monitor = monitor

    def write_events(self, events: Sequence[Event]) -> None:
        m = self.monitor
        if hasattr(m, "write_events"):
            m.write_events(list(events))
            return
        m.events_sink([e.to_dict() for e in events])
        m.events.extend(events)


class _Callback:
    def __init__(self, fn: Callable[[list[Event]], None]):
        self.fn = fn

    def write_events(self, events: Sequence[Event]) -> None:
        self.fn(list(events))


def _name(sink: object) -> str:
    return getattr(sink, "name", None) or type(sink).__name__


class EventFanout:
    """Hands each batch of events to every target, and keeps once-per-run warnings once."""

    def __init__(self, *, rank: int, sinks: Sequence[EventSink] = (), monitor: Any = None, store: Any = None,
                 run_id: int | None = None, on_event: Callable[[list[Event]], None] | None = None):
        if hasattr(sinks, "write_events") or not isinstance(sinks, (list, tuple)):
            raise ConfigError(f"sinks: expected a list of event sinks, got {type(sinks).__name__}")
        for i, s in enumerate(sinks):
            if not callable(getattr(s, "write_events", None)):
                raise ConfigError(f"sinks[{i}]: expected an event sink with write_events(events), got "
                                  f"{type(s).__module__}.{type(s).__qualname__}")
        if store is not None and run_id is None:
            raise ConfigError("run_id: a Guard with store= needs run_id (or pass monitor=... to use the Monitor's run)")
        self.rank = rank
        self.events: list[Event] = []
        self._own: list[Any] = []  # targets the Guard created (closed with it)
        targets: list[Any] = []
        if monitor is not None:
            targets.append(_MonitorEvents(monitor))
        elif store is not None:
            self._own.append(RunStoreEvents(store, run_id))
            targets.append(self._own[-1])
        targets += list(sinks)
        if on_event is not None:
            targets.append(_Callback(on_event))
        self._targets = targets
        self._user_sinks = list(sinks)
        self._warned: set[str] = set()

    def emit(self, events: list[Event]) -> None:
        if not events:
            return
        self.events.extend(events)
        if self.rank != 0:
            return
        for e in events:
            logger.log(_LEVELS.get(e.severity, logging.WARNING), "seismo Guard: %s", e.message, extra={"seismo_event": e})
        for target in list(self._targets):
            try:
                target.write_events(events)
            except Exception as exc:  # noqa: BLE001 - reporting must not stop training: switch this sink off
                self._targets.remove(target)
                self.warn_once(f"sink:{id(target)}", f"seismo Guard: event sink {_name(target)} failed ({exc!r}); "
                                                     "it gets no more Guard events")

    def warn_once(self, key: str, message: str) -> None:
        """A ``GuardWarning``, once per key and run, on rank 0."""
        if key in self._warned or self.rank != 0:
            return
        self._warned.add(key)
        warnings.warn(message, GuardWarning, stacklevel=3)

    def close(self) -> None:
        """Flush the user's sinks (they own them: not closed) and close what the Guard opened."""
        for s in self._user_sinks:
            flush = getattr(s, "flush", None)
            if callable(flush) and s in self._targets:
                try:
                    flush()
                except Exception as exc:  # noqa: BLE001 - a sink failing at the end must not hide the run's result
                    self.warn_once(f"flush:{id(s)}", f"seismo Guard: flushing event sink {_name(s)} failed ({exc!r})")
        for s in self._own:
            try:
                s.close()
            except Exception as exc:  # noqa: BLE001 - as above
                self.warn_once(f"close:{id(s)}", f"seismo Guard: closing {_name(s)} failed ({exc!r})")
