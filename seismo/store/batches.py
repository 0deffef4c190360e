"""Which samples formed each batch: the run store's ``batches`` table.

One row per recorded step::

    batches(run_id INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE, step INTEGER NOT NULL,
            ids_json TEXT NOT NULL,      -- JSON list of the batch's sample indices (ints)
            losses_json TEXT,            -- JSON list of per-sample losses (null: not recorded; NaN as null)
            PRIMARY KEY (run_id, step))

The table is created by the first write (``CREATE TABLE IF NOT EXISTS``), so stores written
without batch ids keep schema version 2 unchanged and older seismo versions ignore the table.
A step written twice (a resumed run re-recording steps) keeps the newest row. PaLM (arXiv
2204.02311) traced its loss spikes to particular batches; these rows name them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from seismo.store.run_store import RunStore

__all__ = ["BatchRecord", "log_batches", "batch_at", "batch_steps"]

_DDL = (
    "CREATE TABLE IF NOT EXISTS batches (run_id INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE, step INTEGER NOT NULL, "
    "ids_json TEXT NOT NULL, losses_json TEXT, PRIMARY KEY (run_id, step))"
)


@dataclass(frozen=True)
class BatchRecord:
    """The samples of one step's batch: ``ids[i]`` is sample i's index, ``losses[i]`` its loss (or None)."""

    step: int
    ids: list[int]
    losses: list[float | None] | None


def _loss_json(losses: Sequence[float] | None) -> str | None:
    if losses is None:
        return None
    return json.dumps([float(v) if math.isfinite(float(v)) else None for v in losses])


def log_batches(store: RunStore, run_id: int, rows: Iterable[tuple[int, Sequence[int], Sequence[float] | None]]) -> None:
    """Write ``(step, ids, losses or None)`` rows for ``run_id`` in one transaction."""
    out = []
    for step, ids, losses in rows:
        if losses is not None and len(losses) != len(ids):
            raise ValueError(f"batches: step {step} has {len(ids)} ids but {len(losses)} losses")
        out.append((int(run_id), int(step), json.dumps([int(i) for i in ids]), _loss_json(losses)))
    if not out:
        return
    with store._write("log_batches") as conn:
        conn.execute(_DDL)
        conn.executemany("INSERT OR REPLACE INTO batches VALUES (?, ?, ?, ?)", out)


def _has_table(conn) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'batches'").fetchone() is not None


def batch_at(store: RunStore, run_id: int, step: int) -> BatchRecord | None:
    """The batch recorded at ``step`` of ``run_id``, or None if none was."""
    with store._read("batch_at") as conn:
        if not _has_table(conn):
            return None
        row = conn.execute("SELECT step, ids_json, losses_json FROM batches WHERE run_id = ? AND step = ?",
                           (int(run_id), int(step))).fetchone()
    if row is None:
        return None
    return BatchRecord(int(row[0]), [int(i) for i in json.loads(row[1])], None if row[2] is None else json.loads(row[2]))


def batch_steps(store: RunStore, run_id: int) -> list[int]:
    """The steps of ``run_id`` with a recorded batch, ascending."""
    with store._read("batch_steps") as conn:
        if not _has_table(conn):
            return []
        return [int(r[0]) for r in conn.execute("SELECT step FROM batches WHERE run_id = ? ORDER BY step", (int(run_id),))]
