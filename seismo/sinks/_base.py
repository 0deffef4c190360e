"""What the three backend sinks share: turning off on a backend failure, names, event text.

A sink sits on the training path, so a failing backend call (a full disk, a dropped connection,
a library bug) must never raise into the loop: :class:`BackendSink` catches it, warns once
naming the sink and the call, and turns the sink off for the rest of the run. The caller (the
Monitor, the Guard) would also drop a raising sink; this keeps the sink's own promise when it is
driven by hand.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

from seismo._io import dumps_json
from seismo.errors import ConfigError
from seismo.events import Event, Record

__all__ = ["BackendSink", "EVENTS_TAG", "EVENT_COLUMNS", "event_row", "event_markdown", "event_line", "to_float", "missing_extra"]

#: Where every backend puts the events (a text tag, a table key, an artifact folder).
EVENTS_TAG = "seismo/events"

#: Columns of an event row (W&B table, MLflow JSON): one per field of :class:`seismo.events.Event`.
EVENT_COLUMNS = ("step", "kind", "severity", "module", "message", "advice", "evidence")


def missing_extra(sink: str, module: str, extra: str) -> ImportError:
    """The one-line error of a sink whose library is not installed."""
    return ImportError(f"seismo.sinks.{sink} needs the {module!r} package: pip install 'seismo[{extra}]'")


def check_prefix(prefix: Any) -> str:
    if not isinstance(prefix, str):
        raise ConfigError(f"prefix must be a string (e.g. 'seismo/'), got {type(prefix).__name__}")
    return prefix


def to_float(value: Any) -> float | None:
    """``float(value)``, or None for a value that is not a number (it is skipped, not sent)."""
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None


def event_row(event: Event) -> list[Any]:
    """One event as a row of :data:`EVENT_COLUMNS` (evidence as a JSON string)."""
    return [int(event.step), event.kind, event.severity, event.module, event.message, event.advice,
            dumps_json(event.evidence, sort_keys=True)]


def event_line(event: Event) -> str:
    """One event on one line of plain text."""
    module = f" in {event.module}" if event.module else ""
    advice = f" | advice: {event.advice}" if event.advice else ""
    return f"step {event.step} {event.severity} {event.kind}{module}: {event.message}{advice}"


def _md(text: str) -> str:
    """Escape the characters that Markdown would otherwise interpret in a user string."""
    out = []
    for ch in text:
        if ch in "\\`*_[]<>|~":
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out).replace("\n", "  \n")


def event_markdown(event: Event) -> str:
    """One event as Markdown (TensorBoard's text dashboard renders Markdown)."""
    module = f" in `{event.module.replace('`', '')}`" if event.module else ""
    lines = [f"**{event.severity}** `{event.kind}` at step {event.step}{module}", "", _md(event.message)]
    if event.advice:
        lines += ["", f"*advice:* {_md(event.advice)}"]
    if event.evidence:
        lines += ["", f"*evidence:* `{dumps_json(event.evidence, sort_keys=True).replace('`', '')}`"]
    return "\n".join(lines)


class BackendSink:
    """A record and event sink for an external logger that never raises into training.

    Subclasses implement ``_write_records``, ``_write_events``, ``_flush`` and ``_close``; the
    public methods call them and, on any exception, warn once and turn the sink off
    (``self.disabled`` holds the reason). ``close()`` is idempotent.
    """

    def __init__(self, prefix: str = "") -> None:
        self.prefix = check_prefix(prefix)
        self.disabled: str | None = None
        #: The run's status as last set by the caller (``completed``, ``failed``, ``diverged``, ...).
        self.status: str | None = None
        self._closed = False

    @property
    def name(self) -> str:
        """How warnings (here and in the Monitor's fan-out) call this sink."""
        return type(self).__name__

    # subclass hooks ---------------------------------------------------------------------
    def _write_records(self, records: Sequence[Record]) -> None:
        raise NotImplementedError

    def _write_events(self, events: Sequence[Event]) -> None:
        raise NotImplementedError

    def _flush(self) -> None:
        pass

    def _set_status(self, status: str, meta: Mapping[str, Any] | None) -> None:
        pass

    def _close(self) -> None:
        pass

    # the sink protocol ------------------------------------------------------------------
    def _call(self, what: str, fn, *args) -> None:
        if self.disabled is not None or self._closed:
            return
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - a logging backend must never kill training: turn off, warn once
            self.disabled = f"{what}: {type(exc).__name__}: {exc}"
            warnings.warn(f"seismo: sink {self.name} is off after a failed {self.disabled}", RuntimeWarning, stacklevel=3)

    def write_records(self, records: Sequence[Record]) -> None:
        """Send the records of one flush (oldest first). Returns None: a backend emits no events."""
        if records:
            self._call("write_records", self._write_records, records)
        return None

    def write_events(self, events: Sequence[Event]) -> None:
        """Send events as text (step, kind, severity, module, message, advice, evidence)."""
        if events:
            self._call("write_events", self._write_events, events)

    def flush(self) -> None:
        """Push buffered data to the backend."""
        self._call("flush", self._flush)

    def set_status(self, status: str, meta: Mapping[str, Any] | None = None) -> None:
        """Record the run's status; a run the sink started ends with it (see each sink)."""
        self.status = str(status)
        self._call("set_status", self._set_status, self.status, meta)

    def close(self) -> None:
        """Flush and release the backend (the run or file this sink opened); idempotent.

        Also tried when the sink is off, so a run or file it opened is not left open; a failure
        then is not warned about again."""
        if self._closed:
            return
        if self.disabled is None:
            self._call("close", self._close)
        else:
            try:
                self._close()
            except Exception:  # noqa: BLE001 - already off and warned once; releasing is best effort
                pass
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def prefixed(self, record: Mapping[str, Any]) -> list[tuple[str, float]]:
        """(prefixed name, float value) of a record's values, skipping values that are not numbers."""
        out = []
        for name, value in record.items():
            v = to_float(value)
            if v is not None:
                out.append((self.prefix + name, v))
        return out
