"""Resume without holes (issue 16 item 3): ``kill -9`` at seeded random moments, then resume.

``seismo train`` and ``seismo sweep`` run as real processes and are killed with SIGKILL at random
times (the RNG is seeded, so a failure names a reproducible schedule), each kill followed by a
resume (``--resume`` when a checkpoint exists, a fresh start otherwise; the sweep is simply run
again). When the run or sweep has finished, every step's metric rows must exist exactly once,
equal bitwise to those of an uninterrupted run, the events likewise, the file must pass SQLite's
integrity check, no run may be left ``running`` and the final losses must equal the
uninterrupted run's bitwise. Killing the sweep driver must also end its pool workers.

The default suite runs 10 kill points; the slow test (``-m slow``) runs more than 100.
"""

from __future__ import annotations

import collections
import json
import math
import os
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seismo.proxy.sweep import load_sweep_file, run_sweep

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO_ROOT = Path(__file__).resolve().parents[2]
WORDS = "the model loss spike attention logit norm grad adam step warm up decay layer head token".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(60_000)))
    return str(path)


def _env() -> dict:
    # One thread per process: the uninterrupted reference and every resumed piece use the same kernels.
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))


def _train_args(corpus: str, out: Path) -> list[str]:
    sets = ["steps=30", "eval_every=15", "checkpoint_every=5", "log_every=5", "data.source=text", f"data.path={corpus}"]
    return [sys.executable, "-m", "seismo", "train", "--preset", "tiny", *(a for s in sets for a in ("--set", s)), "--out", str(out),
            "--name", "k"]


def _write_sweep_file(corpus: str, path: Path) -> Path:
    path.write_text(
        'name = "kill"\nbase = "tiny"\nlrs = [1e-3, 1e-2, 3e-2]\nseeds = [0]\n'
        f'overrides = ["steps=20", "eval_every=10", "log_every=5", "data.source=text", "data.path={corpus}"]\n'
    )
    return path


# --------------------------------------------------------------------------------------
# What is stored, independent of seismo's reading code
# --------------------------------------------------------------------------------------
def _stored(store: Path) -> dict:
    """``{run name or trial key: {"status", "rows", "events", "meta"}}`` read with plain sqlite3."""
    conn = sqlite3.connect(store)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        out: dict = {}
        for run_id, name, status, meta_json in conn.execute("SELECT run_id, name, status, meta_json FROM runs ORDER BY run_id"):
            meta = json.loads(meta_json)
            key = meta.get("trial_key", name)
            assert key not in out, f"{key} is stored twice"
            rows = conn.execute("SELECT step, name, value FROM metrics WHERE run_id = ? ORDER BY name, step", (run_id,)).fetchall()
            events = conn.execute(
                "SELECT step, kind, severity, module, message, evidence_json, advice FROM events WHERE run_id = ? "
                "ORDER BY step, kind, module, message", (run_id,)).fetchall()
            out[key] = dict(status=status, rows=rows, events=events, meta=meta)
        return out
    finally:
        conn.close()


def _assert_same_run(got: dict, ref: dict, what: str) -> None:
    counts = collections.Counter((step, name) for step, name, _ in got["rows"])
    duplicated = sorted(k for k, n in counts.items() if n > 1)
    assert not duplicated, f"{what}: rows stored more than once: {duplicated[:10]}"
    ref_keys = {(step, name) for step, name, _ in ref["rows"]}
    missing = sorted(ref_keys - set(counts))
    assert not missing, f"{what}: {len(missing)} rows missing, e.g. {missing[:10]}"
    assert all(v is None or isinstance(v, float) and not math.isnan(v) for _, _, v in got["rows"]), f"{what}: corrupt value"
    assert got["rows"] == ref["rows"], f"{what}: rows differ from the uninterrupted run"  # bitwise: floats compare exactly
    assert got["events"] == ref["events"], f"{what}: events differ from the uninterrupted run"
    assert got["status"] == ref["status"] == "completed", what


# --------------------------------------------------------------------------------------
# Killing and resuming
# --------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited: it only waits to be reaped


def _run_killed(args: list[str], when, log: Path) -> tuple[bool, list[int]]:
    """Start ``args`` and SIGKILL it once ``when(proc, started)`` says so (``when`` None: never)
    unless it ends first. Returns (killed, the pids of its children at the moment of the kill)."""
    with open(log, "ab") as out:
        started = time.time()
        proc = subprocess.Popen(args, stdout=out, stderr=out, env=_env())
        try:
            while proc.poll() is None:
                if when is not None and when(proc, started):
                    children = _children(proc.pid)
                    proc.kill()
                    proc.wait()
                    return True, children
                time.sleep(0.01)
                assert time.time() - started < 900, f"{args[3]} hangs"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, f"{args[3]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
    return False, []


def _count_runs(store: Path) -> int:
    if not store.exists():
        return 0
    conn = sqlite3.connect(store)
    try:
        return conn.execute("SELECT count(*) FROM runs").fetchone()[0]
    except sqlite3.Error:  # created a moment ago: no schema yet
        return 0
    finally:
        conn.close()


def _after(delay: float, condition=lambda proc, started: True):
    """A ``when`` for :func:`_run_killed`: ``delay`` seconds after ``condition`` first holds."""
    since: list[float] = []

    def when(proc, started) -> bool:
        if not since and condition(proc, started):
            since.append(time.time())
        return bool(since) and time.time() - since[0] >= delay

    return when


def _train_chain(corpus: str, out: Path, rng: random.Random, kills: int, timing: dict, phases: collections.Counter) -> int:
    """Train to the end under ``kills`` random SIGKILLs (fewer if it finishes first); returns the
    kills done. A quarter of the kills hit start-up (any time up to the first checkpoint of an
    uninterrupted run), the rest a random time after this attempt wrote its first checkpoint."""
    run_dir = out / "k"
    ckpt = run_dir / "checkpoint.pt"
    done = 0
    while True:
        result = run_dir / "result.json"
        if result.exists() and json.loads(result.read_text()).get("status") == "completed":
            return done
        args = _train_args(corpus, out)
        if ckpt.exists():
            args.append("--resume")
        when = None
        if done < kills:
            if rng.random() < 0.25:
                when = _after(rng.uniform(0.1, timing["startup"]))
            else:  # once this attempt has written a checkpoint past its starting point
                when = _after(rng.uniform(0.0, 0.6 * timing["training"]), _checkpoints_written(ckpt, 1 if ckpt.exists() else 2))
        killed, _ = _run_killed(args, when, out.parent / f"{out.name}.log")
        if not killed:
            return done
        step = torch.load(ckpt, weights_only=True)["step"] if ckpt.exists() else None
        phases["train: " + ("before any checkpoint" if step is None else "after the step-0 checkpoint" if step == 0
                            else "after a later checkpoint")] += 1
        done += 1


def _checkpoints_written(ckpt: Path, n: int):
    """True once the attempt started at ``started`` has written ``ckpt`` ``n`` times (a fresh run
    writes its step-0 checkpoint first, a resumed one only later checkpoints)."""
    seen: set[int] = set()

    def condition(proc, started) -> bool:
        try:
            mtime = ckpt.stat().st_mtime_ns
        except OSError:
            return False
        if mtime >= started * 1e9:
            seen.add(mtime)
        return len(seen) >= n

    return condition


def _sweep_chain(toml: Path, out: Path, rng: random.Random, kills: int, n_trials: int, phases: collections.Counter) -> int:
    """Sweep to the end under ``kills`` SIGKILLs of the driver, each a random time (0-2 s) after a
    random number of trials (0 .. all but one) were stored and the pool workers were running;
    after each kill the workers must exit."""
    args = [sys.executable, "-m", "seismo", "sweep", str(toml), "--workers", "2", "--out", str(out)]
    store = out / "seismo.sqlite"
    done = 0
    while True:
        when = None
        if done < kills:
            target = rng.randrange(n_trials)

            def ready(proc, started, target=target) -> bool:
                if len([p for p in _children(proc.pid) if _alive(p)]) < 2:
                    return False  # the pool is not up yet: nothing to leave behind
                return target == 0 or _count_runs(store) >= target

            when = _after(rng.uniform(0.0, 2.0), ready)
        killed, children = _run_killed(args, when, out.parent / f"{out.name}.log")
        if not killed:
            return done
        done += 1
        stored = _count_runs(store)
        phases[f"sweep: {stored} of {n_trials} trials stored"] += 1
        deadline = time.time() + 20
        while any(_alive(p) for p in children) and time.time() < deadline:
            time.sleep(0.1)
        survivors = [p for p in children if _alive(p)]
        assert not survivors, f"pool workers {survivors} kept running after the sweep driver was killed"


# --------------------------------------------------------------------------------------
# The campaigns
# --------------------------------------------------------------------------------------
def _train_reference(corpus: str, tmp_path: Path) -> tuple[dict, dict, dict]:
    """The uninterrupted run, and how long its start-up (to the first checkpoint) and training took."""
    out = tmp_path / "train_ref"
    ckpt = out / "k" / "checkpoint.pt"
    seen: list[float] = []

    def watch(proc, started) -> bool:  # never kills: records when the first checkpoint appeared
        if not seen and ckpt.exists():
            seen.append(time.time() - started)
        return False

    t0 = time.time()
    _run_killed(_train_args(corpus, out), watch, tmp_path / "train_ref.log")
    total = time.time() - t0
    startup = seen[0] if seen else total / 2
    (ref,) = _stored(out / "seismo.sqlite").values()
    return ref, json.loads((out / "k" / "result.json").read_text()), dict(startup=startup, training=max(0.5, total - startup))


def _check_train_chain(out: Path, ref: dict, ref_result: dict) -> None:
    runs = _stored(out / "seismo.sqlite")
    assert list(runs) == ["k"], f"{out}: expected one run, found {list(runs)}"  # no orphan left `running`
    _assert_same_run(runs["k"], ref, str(out))
    result = json.loads((out / "k" / "result.json").read_text())
    for key in ("status", "steps_done", "final_train_loss", "final_val_loss", "max_attn_logit"):
        assert result[key] == ref_result[key], (out, key)


def _sweep_reference(toml: Path, tmp_path: Path) -> tuple[dict, float]:
    store = tmp_path / "sweep_ref.sqlite"
    t0 = time.time()
    run_sweep(load_sweep_file(toml), store, workers=1)
    return _stored(store), time.time() - t0


def _check_sweep_chain(out: Path, ref: dict) -> None:
    trials = _stored(out / "seismo.sqlite")
    assert sorted(trials) == sorted(ref), f"{out}: trials stored {len(trials)}, expected {len(ref)}"
    for key, got in trials.items():
        _assert_same_run(got, ref[key], f"{out} trial {got['meta'].get('lr')}")
        assert got["meta"]["final_train_loss"] == ref[key]["meta"]["final_train_loss"]
        assert got["meta"]["final_val_loss"] == ref[key]["meta"]["final_val_loss"]


def _campaign(corpus: str, tmp_path: Path, seed: int, train_kills: int, sweep_kills: int, per_chain: int) -> dict:
    rng = random.Random(seed)
    ref, ref_result, timing = _train_reference(corpus, tmp_path)
    toml = _write_sweep_file(corpus, tmp_path / "kill.toml")
    sweep_ref, _ = _sweep_reference(toml, tmp_path)
    done = dict(train=0, sweep=0, train_chains=0, sweep_chains=0)
    phases: collections.Counter = collections.Counter()
    while done["train"] < train_kills:
        out = tmp_path / f"train{done['train_chains']}"
        done["train"] += _train_chain(corpus, out, rng, min(per_chain, train_kills - done["train"]), timing, phases)
        _check_train_chain(out, ref, ref_result)
        done["train_chains"] += 1
    while done["sweep"] < sweep_kills:
        out = tmp_path / f"sweep{done['sweep_chains']}"
        done["sweep"] += _sweep_chain(toml, out, rng, min(per_chain, sweep_kills - done["sweep"]), len(sweep_ref), phases)
        _check_sweep_chain(out, sweep_ref)
        done["sweep_chains"] += 1
    print(f"kill points: {done}; where: {dict(sorted(phases.items()))}")
    return done


def test_random_kills_and_resumes_leave_every_row_exactly_once(corpus, tmp_path):
    done = _campaign(corpus, tmp_path, seed=2026, train_kills=7, sweep_kills=3, per_chain=7)
    assert done["train"] + done["sweep"] >= 10


@pytest.mark.slow
def test_more_than_a_hundred_random_kills_leave_every_row_exactly_once(corpus, tmp_path):
    t0 = time.time()
    done = _campaign(corpus, tmp_path, seed=16, train_kills=75, sweep_kills=30, per_chain=5)
    assert done["train"] + done["sweep"] >= 100
    print(f"kill points: {done}; {time.time() - t0:.0f} s")
