"""``seismo watch``: a live terminal view of a run that another process is writing.

The view opens the store **read-only** (an SQLite ``mode=ro`` URI with ``PRAGMA query_only``)
and never takes a lock the writer could wait on: the store is in WAL mode, where readers and the
writer do not block each other, and every poll is a few autocommit ``SELECT`` statements (no
transaction stays open between polls, so the writer's WAL checkpoints are never held back). Each
poll reads only the rows added since the previous one (``rowid`` / ``event_id`` above the last
seen), so its cost follows the writer's rate, not the run's length.

:class:`RunWatcher` holds the state (latest value of every signal, the loss history, events);
:func:`render` turns it into a rich renderable; :func:`watch` loops with ``rich.live.Live``.
All user strings (run, module names, event messages) are rich ``Text``, never markup.
"""

from __future__ import annotations

import math
import sqlite3
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from seismo.store import RUNNING, RunInfo, StoreError
from seismo.store.codec import event_from_row
from seismo.store.schema import APPLICATION_ID, EVENT_COLUMNS

__all__ = ["RunWatcher", "SignalValue", "render", "sparkline", "watch", "POLL_INTERVAL_S"]

#: Seconds between polls: the view is at most this far behind the writer's last commit.
POLL_INTERVAL_S = 0.25

_BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 60) -> str:
    """The last ``width`` values as block characters, scaled between their min and max
    (a non-finite value is a space)."""
    values = values[-width:]
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return " " * len(values)
    lo, hi = min(finite), max(finite)
    span = hi - lo
    out = []
    for v in values:
        if not math.isfinite(v):
            out.append(" ")
        else:
            out.append(_BARS[min(len(_BARS) - 1, int((v - lo) / span * len(_BARS))) if span > 0 else 0])
    return "".join(out)


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """A read-only, autocommit connection to an existing run store."""
    if not path.exists():
        raise StoreError(f"run store {path} does not exist")
    uri = "file:" + urllib.parse.quote(str(path.resolve())) + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=1.0, check_same_thread=False)
        conn.execute("PRAGMA query_only = 1")
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open run store {path} read-only: {exc}") from exc
    if app_id != APPLICATION_ID:
        conn.close()
        raise StoreError(f"{path} is not a seismo run store")
    return conn


@dataclass
class SignalValue:
    """The latest value of one signal and the step it was recorded at."""

    step: int
    value: float


@dataclass
class RunWatcher:
    """Follows one run of a store read-only; :meth:`poll` takes in what was written since.

    ``run`` is an id or a name (a reused name means its latest run); None follows the newest run
    of the store. ``history`` is how many loss values are kept for the sparkline.
    """

    store_path: Path
    run: str | int | None = None
    history: int = 200
    max_events: int = 12
    info: RunInfo | None = field(default=None, init=False)  #: the run, as of the last poll
    latest: dict[str, SignalValue] = field(default_factory=dict, init=False, repr=False)  #: signal -> newest value
    loss: deque = field(default_factory=deque, init=False, repr=False)  #: the last ``history`` losses
    events: deque = field(default_factory=deque, init=False, repr=False)  #: the last ``max_events`` events
    n_events: int = field(default=0, init=False)
    n_rows: int = field(default=0, init=False)
    last_poll: float = field(default=0.0, init=False, repr=False)  #: unix time of the last poll
    _rowid: int = field(default=0, init=False, repr=False)
    _event_id: int = field(default=0, init=False, repr=False)
    _conn: sqlite3.Connection | None = field(default=None, init=False, repr=False)
    _run_columns: str = field(default="", init=False, repr=False)

    def __post_init__(self) -> None:
        self.store_path = Path(self.store_path)
        self.loss = deque(maxlen=self.history)
        self.events = deque(maxlen=self.max_events)
        self._conn = _connect_readonly(self.store_path)
        cols = {row[1] for row in self._conn.execute("PRAGMA table_info(runs)").fetchall()}
        heartbeat = "heartbeat" if "heartbeat" in cols else "NULL"  # schema v1 stores have none
        self._run_columns = f"run_id, name, created_at, status, config_json, meta_json, {heartbeat}"

    def _find_run(self) -> RunInfo:
        conn, q = self._connection(), f"SELECT {self._run_columns} FROM runs "
        ref = self.run
        row = None
        if ref is None:
            row = conn.execute(q + "ORDER BY run_id DESC LIMIT 1").fetchone()
            if row is None:
                raise StoreError(f"run store {self.store_path} has no runs yet")
            return RunInfo.from_row(row)
        if isinstance(ref, int) or str(ref).isdecimal():
            row = conn.execute(q + "WHERE run_id = ?", (int(ref),)).fetchone()
        if row is None:
            row = conn.execute(q + "WHERE name = ? ORDER BY run_id DESC LIMIT 1", (str(ref),)).fetchone()
        if row is None:
            raise StoreError(f"no run {ref!r} in {self.store_path}")
        return RunInfo.from_row(row)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"watcher of {self.store_path} is closed")
        return self._conn

    def poll(self) -> int:
        """Read the rows and events written since the last poll; returns how many rows came."""
        conn = self._connection()
        try:
            if self.info is None:
                self.info = self._find_run()
            else:  # status and heartbeat change while the run goes on
                row = conn.execute(f"SELECT {self._run_columns} FROM runs WHERE run_id = ?", (self.info.run_id,)).fetchone()
                self.info = RunInfo.from_row(row) if row is not None else self.info
            rows = conn.execute("SELECT rowid, step, name, value FROM metrics WHERE rowid > ? AND run_id = ? ORDER BY rowid",
                                (self._rowid, self.info.run_id)).fetchall()
            events = conn.execute(f"SELECT {EVENT_COLUMNS} FROM events WHERE event_id > ? AND run_id = ? ORDER BY event_id",
                                  (self._event_id, self.info.run_id)).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"reading run store {self.store_path}: {exc}") from exc
        for rowid, step, name, value in rows:
            value = math.nan if value is None else float(value)
            self.latest[name] = SignalValue(int(step), value)
            if name == "loss":
                self.loss.append(value)
            self._rowid = rowid
        for row in events:
            self.events.append(event_from_row(row))
            self._event_id = row[0]
        self.n_rows += len(rows)
        self.n_events += len(events)
        self.last_poll = time.time()
        return len(rows)

    @property
    def step(self) -> int | None:
        """The latest step any signal was recorded at."""
        return max((v.step for v in self.latest.values()), default=None)

    def groups(self) -> dict[str, list[tuple[str, SignalValue, str]]]:
        """Latest signals by family (``grad``, ``attn``...): ``(metric, value, module)`` rows; a
        per-module metric shows its largest value and the module that has it."""
        out: dict[str, dict[str, tuple[SignalValue, str]]] = {}
        for name, sv in self.latest.items():
            parts = name.split("/", 2)
            family = parts[0]
            metric = "/".join(parts[:2])
            module = parts[2] if len(parts) > 2 else ""
            best = out.setdefault(family, {}).get(metric)
            if best is None or (math.isfinite(sv.value) and not (math.isfinite(best[0].value) and best[0].value >= sv.value)):
                out[family][metric] = (sv, module)
        return {fam: [(m, sv, mod) for m, (sv, mod) in sorted(metrics.items())] for fam, metrics in sorted(out.items())}

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

    def __enter__(self) -> RunWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    return f"{v:.3e}" if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3) else f"{v:.4g}"


def render(w: RunWatcher, width: int = 50) -> Any:
    """One frame: run header, loss sparkline, latest signals by group, latest events."""
    info = w.info
    head = Text()
    if info is None:
        head.append("waiting for the run...")
    else:
        head.append("run ", style="bold")
        head.append(info.name, style="bold cyan")
        head.append(f"  id {info.run_id}  status ")
        head.append(info.status, style="green" if info.status == RUNNING else "yellow")
        head.append(f"  step {w.step if w.step is not None else '-'}  rows {w.n_rows}  events {w.n_events}")
    loss = list(w.loss)
    spark = Text()
    if loss:
        finite = [v for v in loss if math.isfinite(v)]
        spark.append("loss ", style="bold")
        spark.append(sparkline(loss, width), style="cyan")
        spark.append(f"  last {_fmt(loss[-1])}")
        if finite:
            spark.append(f"  min {_fmt(min(finite))}  max {_fmt(max(finite))}")
    else:
        spark.append("loss: nothing recorded yet", style="dim")
    signals = Table(title="latest signals (per-module metrics: the largest module)", expand=False, title_justify="left")
    for col in ("group", "metric", "value", "module", "step"):
        signals.add_column(col, justify="right" if col in ("value", "step") else "left")
    for family, rows in w.groups().items():
        for i, (metric, sv, module) in enumerate(rows):
            signals.add_row(Text(family if i == 0 else "", style="bold"), Text(metric), _fmt(sv.value), Text(module), str(sv.step))
    lines = [Text(f"events: the latest {len(w.events)} of {w.n_events}", style="italic")]
    for e in w.events:  # one line per event, cut at the terminal's width
        sev = e.get("severity") or ""
        line = Text(f"{e.get('step')!s:>7} ", no_wrap=True, overflow="ellipsis")
        line.append(f"{sev:<8} ", style="red" if sev == "critical" else "yellow")
        line.append(e["kind"], style="bold")
        line.append(f" {e.get('module') or '-'}: ", style="cyan")
        line.append(e.get("message") or "")
        lines.append(line)
    events = Group(*lines)
    return Group(Panel(Group(head, spark), title="seismo watch", title_align="left"), signals, events)


def watch(store_path: str | Path, run: str | int | None = None, *, once: bool = False, interval: float = POLL_INTERVAL_S,
          console=None, until_done: bool = True) -> RunWatcher:
    """Show the run live until Ctrl-C (or, with ``until_done``, until it is no longer running);
    ``once`` prints one frame and returns. Returns the watcher (closed)."""
    console = console or Console()
    with RunWatcher(Path(store_path), run) as w:
        w.poll()
        if once:
            console.print(render(w))
            return w
        with Live(render(w), console=console, refresh_per_second=max(1.0, 1.0 / interval), transient=False) as live:
            try:
                while True:
                    time.sleep(interval)
                    w.poll()
                    live.update(render(w))
                    if until_done and w.info is not None and w.info.status != RUNNING:
                        break
            except KeyboardInterrupt:
                pass
        return w
