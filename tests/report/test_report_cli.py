"""``seismo report`` and ``seismo watch`` through the real CLI entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from report_data import EVENTS, XSS, signals, write_run, write_sweep

from seismo.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_report_writes_the_page_and_prints_its_path(store_path, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    write_run(store_path, XSS, signals(), EVENTS)
    write_run(store_path, "other", signals())
    out = tmp_path / "html" / "r.html"
    assert main(["report", "1", "other", "--store", str(store_path), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {out}"
    text = out.read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;, other</h1>" in text
    write_sweep(store_path, "toy")
    assert main(["report", "toy", "--store", str(store_path), "--out", str(out)]) == 0
    assert "seismo sweep report: toy" in out.read_text()


@pytest.mark.parametrize("argv, message", [
    (["report", "nope"], "seismo: error: RUN_OR_SWEEP: no run 'nope'"),
    (["report", "1", "--out", "{tmp}"], "seismo: error: --out: "),
    (["report", "1", "--predict", "-3"], "seismo: error: --predict: must be a positive"),
    (["watch", "9"], "seismo: error: RUN: no run '9'"),
    (["watch", "--interval", "2"], "seismo: error: --interval: must be in (0, 1]"),
])
def test_bad_input_is_one_line_with_status_2(store_path, tmp_path, capsys, argv, message):
    write_run(store_path, "r", signals())
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--store", str(store_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_missing_store_is_refused_and_not_created(tmp_path, capsys):
    missing = tmp_path / "none.sqlite"
    assert main(["watch", "--store", str(missing), "--once"]) == 2
    assert main(["report", "x", "--store", str(missing)]) == 2
    assert "no run store at" in capsys.readouterr().err and not missing.exists()


def test_watch_once_prints_a_frame(store_path, capsys):
    write_run(store_path, "r", signals(), EVENTS)
    assert main(["watch", "r", "--store", str(store_path), "--once"]) == 0
    out = capsys.readouterr().out
    assert "run r" in out and "attn/logit_max" in out and "attention_logit_growth" in out


def test_live_watch_follows_a_run_until_it_ends(store_path):
    """`seismo watch` (no --once) in its own process while another process writes: it shows the
    rows as they come and exits by itself when the run is no longer running."""
    writer = (
        "import sys, time\n"
        "from seismo.store import RunStore\n"
        "with RunStore(sys.argv[1]) as s:\n"
        "    rid = s.create_run('live')\n"
        "    print(rid, flush=True)\n"
        "    sys.stdin.readline()\n"
        "    for step in range(40):\n"
        "        s.log(rid, metrics=[(step, 'loss', 10.0 - step * 0.1)])\n"
        "        time.sleep(0.05)\n"
        "    s.set_status(rid, 'completed')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="120")
    w = subprocess.Popen([sys.executable, "-c", writer, str(store_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    run_id = w.stdout.readline().strip()
    viewer = subprocess.Popen([sys.executable, "-m", "seismo", "watch", run_id, "--store", str(store_path), "--interval", "0.1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    w.stdin.write("\n")
    w.stdin.flush()
    assert w.wait(timeout=60) == 0
    out, err = viewer.communicate(timeout=60)  # exits by itself once the run is completed
    assert viewer.returncode == 0, err
    assert "status completed" in out and "step 39" in out and "last 6.1" in out
