"""How values travel between Python and the store's columns.

Metric values are REAL with NaN as NULL (SQLite has no NaN); config, meta and event evidence are
JSON objects encoded by :func:`seismo._io.json_default`; steps are integers, never floats. Every
``*_rows`` function validates and encodes lazily, so ``executemany`` streams a batch and a bad row
in the middle raises inside the transaction that is then rolled back.
"""

from __future__ import annotations

import enum
import json
import math
import operator
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from typing import Any

import numpy as np

from seismo._io import json_default

__all__ = [
    "EVENT_KEYS",
    "utc_now_iso",
    "dump_object",
    "load_object",
    "encode_value",
    "decode_values",
    "as_step",
    "metric_rows",
    "event_rows",
    "event_from_row",
]

#: The keys an event dict may have (``kind`` is required).
EVENT_KEYS = frozenset({"step", "kind", "severity", "module", "message", "evidence", "advice"})


def utc_now_iso() -> str:
    """The current time as ISO 8601 in UTC, to the microsecond."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def dump_object(value: Mapping[str, Any] | None, what: str) -> str:
    """Serialise an optional mapping to a JSON object string (``None`` is ``{}``)."""
    if value is None:
        return "{}"
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a dict, got {type(value).__name__}")
    return json.dumps(dict(value), default=json_default, sort_keys=True)


def load_object(text: str | None) -> dict[str, Any]:
    """Decode a JSON object column (empty or NULL is ``{}``)."""
    return json.loads(text) if text else {}


def encode_value(value: Any) -> float | None:
    """Encode a metric value for the REAL column; NaN becomes NULL, +-inf stay as they are."""
    number = float(value)
    return None if math.isnan(number) else number


def decode_values(raw: list[float | None]) -> np.ndarray:
    """Decode REAL column values to float64, mapping NULL back to NaN."""
    return np.fromiter((math.nan if v is None else v for v in raw), dtype=np.float64, count=len(raw))


def as_step(step: Any) -> int:
    """Coerce a step to ``int``, rejecting floats and other non-integers."""
    try:
        return operator.index(step)
    except TypeError:
        raise TypeError(f"step must be an integer, got {step!r}") from None


def _optional_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, enum.Enum):
        value = value.value
    return str(value)


def metric_rows(run_id: int, rows: Iterable[tuple[int, str, float]]) -> Iterator[tuple]:
    """Lazily validate and encode ``(step, name, value)`` rows as ``metrics`` table rows."""
    for row in rows:
        step, name, value = row
        if not isinstance(name, str) or not name:
            raise TypeError(f"metric name must be a non-empty str, got {name!r}")
        yield (run_id, as_step(step), name, encode_value(value))


def event_rows(run_id: int, events: Iterable[Mapping[str, Any]]) -> Iterator[tuple]:
    """Lazily validate and encode event dicts as ``events`` table rows (unknown keys are refused)."""
    for event in events:
        if not isinstance(event, Mapping):
            raise TypeError(f"event must be a dict, got {type(event).__name__}")
        unknown = set(event) - EVENT_KEYS
        if unknown:
            raise ValueError(f"unknown event keys {sorted(unknown)}; allowed: {sorted(EVENT_KEYS)}")
        kind = _optional_text(event.get("kind"))
        if not kind:
            raise ValueError(f"event needs a non-empty 'kind': {dict(event)!r}")
        step = event.get("step")
        yield (
            run_id,
            None if step is None else as_step(step),
            kind,
            _optional_text(event.get("severity")),
            _optional_text(event.get("module")),
            _optional_text(event.get("message")),
            dump_object(event.get("evidence"), "event evidence"),
            _optional_text(event.get("advice")),
        )


def event_from_row(row: tuple) -> dict[str, Any]:
    """An ``events`` row (in ``schema.EVENT_COLUMNS`` order) as the dict ``RunStore.events`` returns."""
    event_id, run_id, step, kind, severity, module, message, evidence_json, advice = row
    return {
        "event_id": event_id,
        "run_id": run_id,
        "step": step,
        "kind": kind,
        "severity": severity,
        "module": module,
        "message": message,
        "evidence": load_object(evidence_json),
        "advice": advice,
    }
