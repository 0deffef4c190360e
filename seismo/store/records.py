"""What a read returns: :class:`RunInfo` (one run's row) and :class:`RunData` (a whole run).

Run status is always true. A run's writer stores ``running`` when it starts and one of
``completed``, ``diverged``, ``interrupted`` or ``failed`` on every way out; while it runs, its
writer refreshes the ``heartbeat`` column every few seconds. A process killed with ``kill -9``
cannot write anything, so a ``running`` run whose heartbeat is older than
:data:`STALE_AFTER_S` is reported as ``stale``: :attr:`RunInfo.status` says what is true now,
:attr:`RunInfo.recorded_status` what was last written.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from seismo.store.codec import load_object

__all__ = [
    "RUNNING",
    "COMPLETED",
    "DIVERGED",
    "INTERRUPTED",
    "FAILED",
    "STALE",
    "STALE_AFTER_S",
    "RunInfo",
    "RunData",
    "effective_status",
]

RUNNING, COMPLETED, DIVERGED, INTERRUPTED, FAILED = "running", "completed", "diverged", "interrupted", "failed"

#: Not stored: what a ``running`` run whose heartbeat stopped is reported as.
STALE = "stale"

#: Seconds without a heartbeat after which a ``running`` run is reported as ``stale``
#: (the writer beats every few seconds, see :class:`seismo.store.AsyncWriter`).
STALE_AFTER_S = 60.0


def effective_status(recorded: str, heartbeat: float | None, created_at: str, now: float | None = None,
                     stale_after_s: float | None = None) -> str:
    """``recorded``, except ``stale`` for a ``running`` run silent for more than ``stale_after_s``
    seconds (default :data:`STALE_AFTER_S`).

    A run without a heartbeat (created by a store older than schema version 2) counts from its
    ``created_at``.
    """
    stale_after_s = STALE_AFTER_S if stale_after_s is None else stale_after_s
    if recorded != RUNNING:
        return recorded
    last = heartbeat
    if last is None:
        try:
            last = datetime.fromisoformat(created_at).timestamp()
        except (TypeError, ValueError):
            return recorded  # unreadable timestamp: report what was written
    now = time.time() if now is None else now
    return STALE if now - last > stale_after_s else recorded


@dataclass(frozen=True)
class RunInfo:
    """One row of the ``runs`` table, with JSON columns decoded.

    ``status`` is the run's true state (``stale`` for a ``running`` run whose writer is gone);
    ``recorded_status`` is the stored value; ``heartbeat`` the unix time of the last sign of life.
    """

    run_id: int
    name: str
    created_at: str
    status: str
    config: dict[str, Any] = field(default_factory=dict, hash=False)
    meta: dict[str, Any] = field(default_factory=dict, hash=False)
    heartbeat: float | None = None
    recorded_status: str = ""

    @classmethod
    def from_row(cls, row: tuple, now: float | None = None) -> RunInfo:
        """Build from a row in ``schema.RUN_COLUMNS`` order."""
        run_id, name, created_at, status, config_json, meta_json, heartbeat = row
        if heartbeat is not None and not math.isfinite(heartbeat):
            heartbeat = None
        return cls(
            run_id=run_id,
            name=name,
            created_at=created_at,
            status=effective_status(status, heartbeat, created_at, now),
            config=load_object(config_json),
            meta=load_object(meta_json),
            heartbeat=heartbeat,
            recorded_status=status,
        )


@dataclass
class RunData:
    """Everything stored for one run, as returned by :func:`seismo.store.load_run`.

    ``metrics`` maps each metric name to ``(steps int64, values float64)`` sorted by step;
    ``events`` are in insertion order.
    """

    info: RunInfo
    metrics: dict[str, tuple[np.ndarray, np.ndarray]]
    events: list[dict[str, Any]]

    def series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(steps, values)`` of a metric; KeyError lists what exists."""
        try:
            return self.metrics[name]
        except KeyError:
            available = ", ".join(sorted(self.metrics)) or "<none>"
            raise KeyError(
                f"run {self.info.name!r} (id {self.info.run_id}) has no metric {name!r}; "
                f"available: {available}"
            ) from None
