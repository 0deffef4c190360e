"""``seismo.Monitor``: the Monitor with seismo's detectors and live alerts plugged in.

    monitor = seismo.Monitor(model, optimizer, store="runs/seismo.sqlite", diagnose=True)

:class:`seismo.monitor.Monitor` records signals and fans them out to sinks; it knows no detector.
This facade adds the user-facing shorthands: ``diagnose=True`` (or a
:class:`~seismo.diagnose.Diagnoser`) becomes a record sink that returns events, and the alert
printer (or ``on_event``) an event sink. Events reach the run store, ``monitor.events``, logging and
every other event sink.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

from seismo.diagnose.engine import AlertPrinter, Diagnoser
from seismo.errors import ConfigError
from seismo.events import Event
from seismo.monitor import Monitor as _Monitor
from seismo.monitor import MonitorConfig

__all__ = ["Monitor", "CallbackEventSink"]


class CallbackEventSink:
    """An event sink around a plain callable ``f(events)`` (the ``on_event=`` shorthand)."""

    def __init__(self, fn: Callable[[list[Event]], Any]):
        if not callable(fn):
            raise ConfigError(f"on_event: must be a callable f(events), got {type(fn).__name__}")
        self.fn = fn
        self.name = getattr(fn, "__name__", type(fn).__name__)

    def write_events(self, events: Sequence[Event]) -> None:
        self.fn(list(events))


class Monitor(_Monitor):
    """:class:`seismo.monitor.Monitor` plus detectors and alerts.

    Args (besides those of :class:`seismo.monitor.Monitor`):
        diagnose: True (seismo's default detectors) or a :class:`~seismo.diagnose.Diagnoser`: the
            detectors see every flushed record; their events go to the event sinks (the run store
            among them), ``self.events`` and ``on_event``. The Diagnoser is ``self.diagnoser``.
        on_event: called with each batch of new events.
        alerts: with ``diagnose`` and no ``on_event``, print events to stderr with a rate-limited
            :class:`~seismo.diagnose.AlertPrinter` (True), not at all (False), or through the given
            event sink (an ``AlertPrinter`` of your own, say).
    """

    def __init__(
        self,
        model: Any,
        optimizer: Any = None,
        config: MonitorConfig | dict | None = None,
        *,
        sinks: Iterable[Any] = (),
        diagnose: bool | Diagnoser = False,
        on_event: Callable[[list[Event]], Any] | None = None,
        alerts: bool | Any = True,
        **kwargs: Any,
    ):
        if diagnose is not False and diagnose is not None and not isinstance(diagnose, (bool, Diagnoser)):
            raise ConfigError(f"diagnose: must be True, False or a seismo.diagnose.Diagnoser, got {type(diagnose).__name__}")
        self.diagnoser: Diagnoser | None = None
        extra: list[Any] = []
        if diagnose:
            self.diagnoser = diagnose if isinstance(diagnose, Diagnoser) else Diagnoser()
            extra.append(self.diagnoser)
        if on_event is not None:
            extra.append(CallbackEventSink(on_event))
        elif self.diagnoser is not None and alerts is not False:
            extra.append(AlertPrinter() if alerts is True else alerts)
        super().__init__(model, optimizer, config, sinks=[*sinks, *extra], **kwargs)
