"""Events and the two Protocols through which the layers above meet.

- :class:`Event`: what a detector (or the Guard) says happened, with evidence and advice.
- :class:`RecordSink`: receives flushed records, a batch per flush. It may return new events
  (a detector does), which the caller hands to every :class:`EventSink`.
- :class:`EventSink`: receives events.

A sink may implement either or both, and may have ``flush()`` and ``close()``; whoever fans
out to sinks (the Monitor, the Guard) calls them when present. The run store, the detectors, the
live alert printer and the TensorBoard / W&B / MLflow sinks are all sinks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

__all__ = ["Event", "SEVERITIES", "KINDS", "Record", "RecordSink", "EventSink"]

#: One flushed step: (step, {signal name: value}).
Record = tuple[int, Mapping[str, float]]

SEVERITIES = ("info", "warning", "critical")

#: Every event kind a built-in detector can emit (public API: names are frozen by a test).
KINDS = (
    "loss_spike",
    "loss_divergence",
    "loss_regression",
    "grad_spike",
    "update_spike",
    "nonfinite",
    "attention_logit_growth",
    "attention_entropy_collapse",
    "output_logit_divergence",
    "edge_of_stability",
    "adam_decorrelation",
    "epsilon_regime",
    "softmax_collapse",
    "gradient_variance_extreme",
    "activation_growth",
    "stall",
    "loss_scale_drop",
)


@dataclass
class Event:
    """One named instability.

    ``severity`` is ``info``, ``warning`` (early warning or mild) or ``critical``; ``module`` is
    the module held responsible ("" when the signal is global); ``evidence`` holds the numbers
    the decision was made on; ``advice`` is the playbook's first recommendation.
    """

    kind: str
    severity: str
    step: int
    module: str = ""
    message: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)
    advice: str = ""

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class RecordSink(Protocol):
    """Receives the records of one flush, oldest first; returns new events or None."""

    def write_records(self, records: Sequence[Record]) -> Sequence[Event] | None: ...


@runtime_checkable
class EventSink(Protocol):
    """Receives events as they are emitted."""

    def write_events(self, events: Sequence[Event]) -> None: ...
