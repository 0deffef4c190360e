"""Run detectors live (as a Monitor listener) or over a stored run, and explain the result."""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from rich.markup import escape

from seismo.diagnose.attribution import attribute_shared_spikes
from seismo.diagnose.detectors import Detector, default_detectors
from seismo.diagnose.playbook import CAUSES, PRIORITY, mitigations_for
from seismo.diagnose.replay import History, records_of, replay_events
from seismo.events import Event
from seismo.store import load_run

__all__ = ["Diagnoser", "Diagnosis", "diagnose_history", "diagnose_run", "AlertPrinter"]

EventSink = Callable[[list[Event]], None]


class Diagnoser:
    """Feed it ``(step, {signal: value})`` records; it runs every detector and fans events out.

    Use it as a record sink of the Monitor (``seismo.Monitor(..., diagnose=True)`` does this:
    :meth:`write_records` takes a flush's records and returns the events), or call it per record.
    Each ``warning`` / ``critical`` event gets the playbook's first recommendation as ``advice``
    (an ``info`` event, such as an isolated loss outlier, advises nothing). A detector that raises
    is disabled with one warning; the others go on. :meth:`replay` runs a whole recorded history
    at once (numpy statistics, the same events as streaming it).
    """

    def __init__(self, detectors: Sequence[Detector] | None = None, sinks: Iterable[EventSink] = ()):
        self.detectors = list(default_detectors() if detectors is None else detectors)
        names = [d.name for d in self.detectors]
        if len(set(names)) != len(names):
            raise ValueError(f"detector names must be unique, got {names}")
        self.sinks = list(sinks)
        self.events: list[Event] = []
        self.disabled: dict[str, str] = {}

    def __call__(self, step: int, values: Mapping[str, float]) -> list[Event]:
        new: list[Event] = []
        for det in list(self.detectors):
            try:
                evs = det.update(step, values)
            except Exception as exc:  # noqa: BLE001 - a detector failure must never stop training: disable it, warn once
                self.detectors.remove(det)
                self.disabled[det.name] = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"seismo: detector '{det.name}' is off: {type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
                continue
            new.extend(evs)
        self._publish(new)
        return new

    def replay(self, history: History) -> list[Event]:
        """Run the detectors (which must be fresh) over a whole recorded history (``{name: (steps,
        values)}``) and return the events, as streaming its records would (same events, same order)."""
        new = replay_events(history, self.detectors)
        self._publish(new)
        return new

    def _publish(self, new: list[Event]) -> None:
        for e in new:
            if not e.advice and e.severity != "info":
                mit = mitigations_for(e.kind)
                e.advice = mit[0].advice() if mit else ""
        if not new:
            return
        self.events.extend(new)
        for sink in list(self.sinks):
            try:
                sink(new)
            except Exception as exc:  # noqa: BLE001 - an event sink failure must never stop training: drop it, warn once
                self.sinks.remove(sink)
                warnings.warn(f"seismo: event sink is off: {exc!r}", RuntimeWarning, stacklevel=3)

    def write_records(self, records: Sequence[tuple[int, Mapping[str, float]]]) -> list[Event]:
        """The RecordSink form (``seismo.events``): run the detectors over a flush, return the new events."""
        new: list[Event] = []
        for step, values in records:
            new.extend(self(step, values))
        return new

    def state_dict(self) -> dict:
        return {d.name: d.state_dict() for d in self.detectors}

    def load_state_dict(self, state: dict) -> None:
        for d in self.detectors:
            if d.name in state:
                d.load_state_dict(state[d.name])


class AlertPrinter:
    """Print events as they come without flooding: at most one line per (kind, module) every
    ``quiet_steps`` steps, and a count of what was held back. ``warning`` and above by default
    (``min_severity="info"`` shows isolated outliers too). Event text is escaped for rich markup."""

    def __init__(self, console=None, quiet_steps: int = 200, min_severity: str = "warning"):
        if console is None:
            from rich.console import Console

            console = Console(stderr=True, highlight=False)
        self.console = console
        self.quiet_steps = quiet_steps
        self.min_rank = {"info": 0, "warning": 1, "critical": 2}[min_severity]
        self.last: dict[tuple[str, str], int] = {}
        self.held: dict[tuple[str, str], int] = defaultdict(int)

    def write_events(self, events: Sequence[Event]) -> None:
        """The EventSink form (``seismo.events``)."""
        self(list(events))

    def __call__(self, events: list[Event]) -> None:
        for e in events:
            if {"info": 0, "warning": 1, "critical": 2}[e.severity] < self.min_rank:
                continue
            key = (e.kind, e.module)
            if key in self.last and e.step - self.last[key] < self.quiet_steps and e.severity != "critical":
                self.held[key] += 1
                continue
            more = self.held.pop(key, 0)
            color = "red" if e.severity == "critical" else "yellow"
            extra = f" (+{more} similar)" if more else ""
            where = f" in {escape(e.module)}" if e.module and e.module not in e.message else ""
            head = f"[{color}]seismo {e.severity} at step {e.step}: {escape(e.kind)}[/{color}]"
            self.console.print(f"{head}{where} {escape(e.message)}{extra}")
            if e.advice:
                self.console.print(f"    try: {escape(e.advice)}")
            self.last[key] = e.step


@dataclass
class Diagnosis:
    """The readable answer for a run: events, modules involved, likely cause, what to change."""

    run: str
    events: list[Event]
    cause_kind: str | None
    cause: str
    first_step: int | None
    modules: dict[str, int]
    recommendations: list[dict[str, str]]
    signals_seen: list[str] = field(default_factory=list)
    shared_spikes: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run, "cause_kind": self.cause_kind, "cause": self.cause, "first_step": self.first_step,
            "modules": self.modules, "recommendations": self.recommendations,
            "events": [e.to_dict() for e in self.events], "signals_seen": self.signals_seen,
            "shared_spikes": self.shared_spikes,
        }


def diagnose_history(history: History, run: str = "run", detectors: Sequence[Detector] | None = None,
                     streaming: bool = False) -> Diagnosis:
    """Replay a run's signals (``{name: (steps, values)}``) through fresh detectors. The batch
    replay (:meth:`Diagnoser.replay`) by default; ``streaming=True`` feeds the records one by one
    (the reference the replay is tested against)."""
    diag = Diagnoser(detectors)
    if streaming:
        for step, values in records_of(history):
            diag(step, values)
    else:
        diag.replay(history)
    return summarize(diag.events, run, sorted(history))


def summarize(events: list[Event], run: str, signals: list[str] | None = None) -> Diagnosis:
    modules: dict[str, int] = defaultdict(int)
    for e in events:
        if e.module:
            modules[e.module] += 1
    kinds = {e.kind for e in events if e.severity in ("warning", "critical")}
    cause_kind = next((k for k in PRIORITY if k in kinds), None)
    first = min((e.step for e in events if e.kind == cause_kind), default=None)
    if cause_kind is None:
        cause = "no instability detected"
    else:
        cause = CAUSES[cause_kind] + (f", first seen at step {first}" if first is not None else "")
    recs: list[dict[str, str]] = []
    seen = set()
    for kind in [k for k in PRIORITY if k in kinds]:
        for m in mitigations_for(kind):
            if m.name in seen:
                continue
            seen.add(m.name)
            recs.append({"for": kind, "name": m.name, "how": m.how, "call": m.call, "paper": m.paper})
    return Diagnosis(run, events, cause_kind, cause, first, dict(sorted(modules.items(), key=lambda kv: -kv[1])), recs, signals or [])


def diagnose_run(store_path: str, run: str | int, replay: bool = True, compare: Sequence[str | int] = ()) -> Diagnosis:
    """Diagnose a stored run. With ``replay`` the stored signals are run through today's
    detectors; otherwise the events stored during the run are used. ``compare`` names other runs
    of the store that saw the same data in the same order: a loss spike at the same step (+-1)
    in any of them is attributed to the data (``Diagnosis.shared_spikes``, and the event says so)."""
    data = load_run(store_path, run)
    label = f"{data.info.name} (id {data.info.run_id})"
    if replay:
        d = diagnose_history(data.metrics, label)
    else:
        events = [Event(e["kind"], e.get("severity") or "warning", int(e.get("step") or 0), e.get("module") or "",
                        e.get("message") or "", e.get("evidence") or {}, e.get("advice") or "") for e in data.events]
        d = summarize(events, label, sorted(data.metrics))
    if compare:
        others = {}
        for ref in compare:
            other = load_run(store_path, ref)
            others[other.info.name] = other.metrics
        d.shared_spikes = attribute_shared_spikes(d.events, others)
    return d
