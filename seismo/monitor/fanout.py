"""``SinkFanout``: hands each flush to every record sink and each event to every event sink.

The shape of torchtitan's ``LoggerContainer``: one object that looks like a sink and calls many.
A sink that raises is removed with one ``RuntimeWarning`` (a misconfiguration, reported once);
the others, and training, go on. Sinks are the :class:`~seismo.events.RecordSink` /
:class:`~seismo.events.EventSink` protocols, with optional ``flush()``, ``set_status(status, meta)``
and ``close()``.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Iterable, Sequence

from seismo.errors import ConfigError
from seismo.events import Event, Record

__all__ = ["SinkFanout", "sink_name"]

_log = logging.getLogger("seismo.events")


def sink_name(sink: Any) -> str:
    return getattr(sink, "name", None) or type(sink).__name__


class SinkFanout:
    """Fan-out over ``sinks``, in order. Events returned by record sinks go to every event sink."""

    def __init__(self, sinks: Iterable[Any] = ()):
        self.sinks: list[Any] = []
        for s in sinks:
            self.add(s)

    def add(self, sink: Any) -> None:
        if not callable(getattr(sink, "write_records", None)) and not callable(getattr(sink, "write_events", None)):
            raise ConfigError(f"sinks: {type(sink).__name__} has neither write_records(records) nor write_events(events)")
        self.sinks.append(sink)

    def _call(self, sink: Any, method: str, *args: Any) -> Any:
        fn: Callable | None = getattr(sink, method, None)
        if fn is None or sink not in self.sinks:
            return None
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - a sink failure must never kill training: the sink is removed, warned once
            self.sinks.remove(sink)
            warnings.warn(f"seismo: sink '{sink_name(sink)}' is off ({method} raised {type(exc).__name__}: {exc})", RuntimeWarning,
                          stacklevel=4)
            return None

    def write_records(self, records: Sequence[Record]) -> list[Event]:
        """One ``write_records`` call per record sink; returns the events they produced."""
        new: list[Event] = []
        for sink in list(self.sinks):
            events = self._call(sink, "write_records", records)
            if events:
                new.extend(events)
        return new

    def write_events(self, events: Sequence[Event]) -> None:
        if not events:
            return
        for e in events:
            _log.info("step %s: %s %s%s: %s", e.step, e.severity, e.kind, f" [{e.module}]" if e.module else "", e.message)
        for sink in list(self.sinks):
            self._call(sink, "write_events", events)

    def flush(self) -> None:
        for sink in list(self.sinks):
            self._call(sink, "flush")

    def set_status(self, status: str, meta: dict | None = None) -> None:
        for sink in list(self.sinks):
            self._call(sink, "set_status", status, meta)

    def close(self) -> None:
        for sink in list(self.sinks):
            self._call(sink, "close")
