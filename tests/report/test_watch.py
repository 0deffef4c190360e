"""``seismo watch``'s reader: read-only, at most ~1 s behind a writer in another process, and not
slowing that writer down."""

from __future__ import annotations

import io
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from report_data import EVENTS, XSS, signals, write_run

from seismo.report.watch import RunWatcher, render, sparkline, watch
from seismo.store import StoreError

REPO = Path(__file__).resolve().parents[2]

WRITER = textwrap.dedent("""
    import sys, time
    from seismo.store import RunStore
    path, seconds = sys.argv[1], float(sys.argv[2])
    with RunStore(path, durable=False) as store:
        run_id = store.create_run("live")
        print(run_id, flush=True)
        sys.stdin.readline()  # go
        t0, step = time.time(), 0
        while time.time() - t0 < seconds:
            rows = [(step, "loss", 1.0 / (step + 1)), (step, "time/wall", time.time())]
            rows += [(step, f"grad/norm/m{i}", float(i)) for i in range(30)]
            store.log(run_id, metrics=rows, events=[{"step": step, "kind": "loss_spike", "message": "[bold]x[/bold]"}] if step == 5 else [])
            step += 1
        store.set_status(run_id, "completed")
        print(step, flush=True)
""")


def _writer(store_path: Path, seconds: float) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(store_path), str(seconds)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    return proc, int(proc.stdout.readline())


def _steps_written(store_path: Path, seconds: float, watched: bool) -> tuple[int, list[float]]:
    """Run a writer for ``seconds``; with ``watched``, poll it like ``seismo watch`` does and return
    how stale the view was at each poll (now minus the wall time of the newest row seen)."""
    proc, run_id = _writer(store_path, seconds)
    staleness: list[float] = []
    watcher = RunWatcher(store_path, run_id) if watched else None
    proc.stdin.write("\n")
    proc.stdin.flush()
    t0 = time.time()
    while watcher is not None and time.time() - t0 < seconds:
        time.sleep(0.25)
        watcher.poll()
        render(watcher)  # the frame is built as in the live view
        if "time/wall" in watcher.latest:
            staleness.append(time.time() - watcher.latest["time/wall"].value)
    steps = int(proc.stdout.readline())
    proc.wait(timeout=30)
    if watcher is not None:
        watcher.poll()
        assert watcher.info.status == "completed"
        assert watcher.step == steps - 1 and len(watcher.loss) == min(steps, watcher.history)
        watcher.close()
    return steps, staleness


def test_watch_follows_a_writer_process_within_a_second_without_slowing_it(tmp_path):
    alone1, _ = _steps_written(tmp_path / "a.sqlite", 2.0, watched=False)
    watched, staleness = _steps_written(tmp_path / "b.sqlite", 2.0, watched=True)
    alone2, _ = _steps_written(tmp_path / "c.sqlite", 2.0, watched=False)
    assert len(staleness) >= 4
    assert max(staleness) < 1.0, staleness
    baseline = (alone1 + alone2) / 2
    print(f"writer steps in 2 s: alone {alone1}, {alone2}; watched {watched} ({watched / baseline:.2f}x); "
          f"staleness max {max(staleness):.3f} s")
    assert watched > 0.6 * baseline, (alone1, watched, alone2)  # generous: the machine is shared


def test_the_watcher_is_read_only(store_path):
    with pytest.raises(StoreError, match="does not exist"):
        RunWatcher(store_path)
    assert not store_path.exists()  # looking did not create it
    write_run(store_path, "r", signals())
    with RunWatcher(store_path) as w:
        w.poll()
        with pytest.raises(sqlite3.OperationalError, match="readonly|read-only|query_only"):
            w._conn.execute("DELETE FROM metrics")
    with sqlite3.connect(store_path) as conn:
        assert conn.execute("SELECT count(*) FROM metrics").fetchone()[0] == sum(len(s) for s, _ in signals().values())


def test_one_frame_shows_groups_the_max_module_and_user_text_literally(store_path):
    write_run(store_path, "older", {"loss": signals()["loss"]})
    events = EVENTS + [{"step": 55, "kind": "grad_spike", "severity": "warning", "module": "[red]m[/red]", "message": "[bold]hi[/bold]"}]
    write_run(store_path, XSS, signals(), events)
    buf = io.StringIO()
    from rich.console import Console

    w = watch(store_path, None, once=True, console=Console(file=buf, width=160, color_system=None))
    frame = buf.getvalue()
    assert w.info.name == XSS  # no RUN: the newest run
    assert XSS in frame and "[red]m[/red]" in frame and "[bold]hi[/bold]" in frame  # markup stays text
    row = next(line for line in frame.splitlines() if "attn/logit_max" in line)
    assert "h.1.attn" in row and f"{2.0 * 2.718281828 ** (0.08 * 59):.4g}" in row  # the larger layer, at the last step
    assert "step 59" in frame and "events 3" in frame


def test_sparkline_scales_between_min_and_max():
    assert sparkline([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]) == "▁▂▃▄▅▆▇█"
    assert sparkline([1.0, float("nan"), 1.0]) == "▁ ▁"
