"""Sweeps (seismo.proxy.sweep) and the ``seismo sweep`` command.

* ``expand``: the number and order of trials, content-hash keys, bad overrides failing before
  anything runs; TOML sweep files;
* determinism: 1 and 2 local workers, and the Ray backend, store bitwise identical results;
* resumability: the real CLI is killed with SIGKILL (its whole session: driver, pool workers or
  Ray's raylet, GCS and workers) once some but not all trials are stored, then re-run; every trial
  is then stored exactly once and the SQLite file passes ``PRAGMA integrity_check``.

The ``seismo sweep`` command's output and errors are tested in tests/cli/test_cli_sweep.py.

The kill tests need Linux (/proc); the Ray ones are skipped without Ray (``seismo[ray]``).
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from seismo.proxy.model import ConfigError
from seismo.proxy.sweep import SweepConfig, expand, load_sweep_file, load_sweep_results, run_sweep
from seismo.proxy.sweep_presets import SIZES, get_sweep_preset
from seismo.store import RunStore

# A training run of a fraction of a second: the quick presets' settings, smaller.
TINY_RUN = ["steps=10", "batch_size=8", "model.block_size=32", "optim.warmup_steps=2", "eval_every=0", "eval_batches=2",
            "data.max_bytes=100000", "log_every=5"]
STEPS_PER_KILL_TRIAL = 30  # about 1 s per trial on a shared 2-core machine: the kill lands mid-sweep

KILL_TOML = f"""\
# 2 interventions x 1 size x 4 lrs = 8 trials of about a second
name = "kill-test"
lrs = [1e-3, 1e-2, 3e-2, 1e-1]
seeds = [0]
overrides = ["steps={STEPS_PER_KILL_TRIAL}", "batch_size=8", "model.block_size=32", "optim.warmup_steps=5", "eval_every=0",
             "eval_batches=2", "data.max_bytes=100000", "log_every=10"]

[sizes]
xs = ["model.n_embd=32", "model.n_layer=1", "model.n_head=2"]

[interventions]
baseline = []
qk_norm = ["model.qk_norm=true"]
"""

LINUX = sys.platform.startswith("linux") and Path("/proc/self/stat").exists()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """workers=1 runs trials in this process, and ``run_trial`` sets one torch thread: restore it."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich tables on one line each


def tiny_sweep(name: str = "tiny", **kw) -> SweepConfig:
    """2 interventions x 1 size x 2 lrs = 4 trials of 10 steps."""
    args = dict(name=name, lrs=[1e-2, 1e-1], sizes={"xs": SIZES["xs"]},
                interventions={"baseline": [], "qk_norm": ["model.qk_norm=true"]}, overrides=list(TINY_RUN))
    args.update(kw)
    return SweepConfig(**args)


def by_key(db: Path, sweep: str) -> dict[str, dict]:
    return {r["trial_key"]: r for r in load_sweep_results(db, sweep)}


def same_float(a: float, b: float) -> bool:
    """Bitwise equality for results (NaN equals NaN)."""
    return (math.isnan(a) and math.isnan(b)) or a == b


# --- expand and sweep files -------------------------------------------------------------------

def test_expand_number_and_order_of_trials():
    sweep = tiny_sweep(lrs=[1e-3, 1e-2, 1e-1], sizes={"xs": SIZES["xs"], "s": SIZES["s"]}, seeds=[0, 1])
    trials = expand(sweep)
    assert len(trials) == 2 * 2 * 3 * 2
    # intervention, then size, then lr, then seed: the last one varies fastest
    order = [(t.intervention, t.size, t.lr, t.seed) for t in trials]
    assert order == [(i, s, lr, seed) for i in ("baseline", "qk_norm") for s in ("xs", "s") for lr in (1e-3, 1e-2, 1e-1)
                     for seed in (0, 1)]
    t = trials[11]
    assert t.run_name == "tiny/baseline/s/lr=0.1/seed=1"
    assert t.config["optim"]["lr"] == 0.1 and t.config["seed"] == 1
    assert t.config["model"]["n_embd"] == 64 and t.config["model"]["qk_norm"] is False
    assert trials[-1].config["model"]["qk_norm"] is True
    assert t.config["steps"] == 10 and t.config["out_dir"] == "" and t.config["store"] == ""


def test_trial_keys_are_stable_unique_and_follow_the_config():
    keys = [t.key for t in expand(tiny_sweep())]
    assert keys == [t.key for t in expand(tiny_sweep())]  # stable across calls
    assert len(set(keys)) == len(keys)
    assert all(len(k) == 16 and int(k, 16) >= 0 for k in keys)
    # a different config (one more step) gives different keys for every trial
    other = [t.key for t in expand(tiny_sweep(overrides=TINY_RUN + ["steps=11"]))]
    assert not set(other) & set(keys)
    # the key is the content of the training config: the sweep's and the run's names are not in it
    assert [t.key for t in expand(tiny_sweep(name="renamed"))] == keys
    # the lr and the seed are
    assert {t.key for t in expand(tiny_sweep(lrs=[1e-2, 2e-1]))} & set(keys) == {keys[0], keys[2]}
    assert not {t.key for t in expand(tiny_sweep(seeds=[1]))} & set(keys)


@pytest.mark.parametrize("change, match", [
    (dict(overrides=TINY_RUN + ["model.nope=1"]), "model.nope: unknown key 'nope'"),
    (dict(overrides=TINY_RUN + ["steps=ten"]), "steps: expected an integer"),
    (dict(interventions={"baseline": [], "bad": ["model.qk_norm=maybe"]}), "model.qk_norm: expected true or false"),
    (dict(sizes={"odd": ["model.n_embd=30", "model.n_head=4"]}), "n_embd"),
    (dict(lrs=[]), "sweep.lrs"),
    (dict(lrs=[1e-2, -1.0]), "sweep.lrs"),
    (dict(name="a/b"), "sweep.name"),
    (dict(seeds=[]), "at least one"),
    # two names for one config: a resumed sweep would store one and drop the other
    (dict(interventions={"baseline": [], "qk_off": ["model.qk_norm=false"]}), "identical configs"),
])
def test_bad_sweeps_fail_before_running(tmp_path, change, match):
    sweep = tiny_sweep(**change)
    with pytest.raises(ConfigError, match=match):
        expand(sweep)
    db = tmp_path / "s.sqlite"
    with pytest.raises(ConfigError, match=match):
        run_sweep(sweep, db, workers=1)
    assert not db.exists()  # nothing ran, nothing was written


def test_run_sweep_rejects_bad_backend_and_workers(tmp_path):
    with pytest.raises(ConfigError, match="backend"):
        run_sweep(tiny_sweep(), tmp_path / "s.sqlite", backend="slurm")
    with pytest.raises(ConfigError, match="workers"):
        run_sweep(tiny_sweep(), tmp_path / "s.sqlite", workers=-1)
    assert not (tmp_path / "s.sqlite").exists()


def test_load_sweep_file(tmp_path):
    path = tmp_path / "kill.toml"
    path.write_text(KILL_TOML)
    sweep = load_sweep_file(path)
    assert sweep.name == "kill-test"
    assert sweep.lrs == [1e-3, 1e-2, 3e-2, 1e-1]
    assert sweep.sizes == {"xs": SIZES["xs"]}
    assert sweep.interventions == {"baseline": [], "qk_norm": ["model.qk_norm=true"]}
    assert sweep.base == "baseline" and sweep.seeds == [0]
    assert len(expand(sweep)) == 8
    # the name defaults to the file's stem
    (tmp_path / "my-grid.toml").write_text("lrs = [1e-2]\n")
    assert load_sweep_file(tmp_path / "my-grid.toml").name == "my-grid"


@pytest.mark.parametrize("text, match", [
    ('name = "x"\nlearning_rates = [1e-2]\nsteps = 3\n', r"unknown key\(s\) \['learning_rates', 'steps'\]"),
    ('name = "x"\nlrs = [1e-2\n', "sweep file"),
    ('name = "x"\nlrs = []\n', "sweep.lrs"),
])
def test_bad_sweep_files(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_sweep_file(path)


def test_the_docs_example_sweep_file_and_preset_are_valid(tmp_path):
    doc = (Path(__file__).parents[2] / "docs" / "PROXY_LAB.md").read_text()
    toml = re.search(r"```toml\n(.*?)```", doc, re.S).group(1)
    (tmp_path / "clip.toml").write_text(toml)
    trials = expand(load_sweep_file(tmp_path / "clip.toml"))
    assert len(trials) == 32  # "2 interventions x 2 sizes x 4 LRs x 2 seeds = 32 trials"
    code = re.search(r"```python\n(from seismo.proxy.sweep import SweepConfig.*?)```", doc, re.S).group(1)
    code = code.replace("run_sweep(sweep, ", "expanded = expand(sweep)  # not run: ")
    scope: dict = {"expand": expand}
    exec(code, scope)
    assert len(scope["expanded"]) == 12


@pytest.mark.parametrize("quick", [True, False])
def test_qk_clip_preset_is_qk_layernorms_grid_plus_one_arm(quick):
    """``qk_clip``'s baseline and qk_norm trials are ``qk_layernorm``'s, config for config (the same
    trial keys: docs/REPRODUCTIONS.md reuses the stored ones); its qk_clip arm is the baseline's
    config with ``qk_clip = 100`` (Kimi K2's tau) and nothing else changed."""
    clip, ln = expand(get_sweep_preset("qk_clip", quick)), expand(get_sweep_preset("qk_layernorm", quick))
    cell = lambda t: (t.intervention, t.size, t.lr, t.seed)  # noqa: E731
    ln_keys = {cell(t): t.key for t in ln}
    shared = [t for t in clip if t.intervention in ("baseline", "qk_norm")]
    assert len(shared) == len(ln) and all(ln_keys[cell(t)] == t.key for t in shared)
    base = {(t.size, t.lr, t.seed): t.config for t in clip if t.intervention == "baseline"}
    arm = [t for t in clip if t.intervention == "qk_clip"]
    assert len(arm) == len(base)
    for t in arm:
        ref = dict(base[(t.size, t.lr, t.seed)], qk_clip=100.0, run_name=t.config["run_name"])
        assert t.config == ref and base[(t.size, t.lr, t.seed)]["qk_clip"] == 0.0


def test_missing_sweep_file(tmp_path):
    with pytest.raises(ConfigError, match="sweep file"):
        load_sweep_file(tmp_path / "nope.toml")


# --- determinism and skipping -----------------------------------------------------------------

@pytest.fixture(scope="module")
def one_worker(tmp_path_factory):
    """The tiny sweep run in this process (workers=1): the reference for the other backends."""
    db = tmp_path_factory.mktemp("w1") / "seismo.sqlite"
    ids = run_sweep(tiny_sweep(), db, workers=1)
    assert len(ids) == 4
    return db


def assert_same_results(db_a: Path, db_b: Path, sweep: str, n: int) -> None:
    a, b = by_key(db_a, sweep), by_key(db_b, sweep)
    assert len(a) == n and set(a) == set(b)
    for key, ra in a.items():
        rb = b[key]
        for field in ("status", "steps_done", "intervention", "size", "lr", "seed"):
            assert ra[field] == rb[field], (key, field)
        for field in ("final_val_loss", "final_train_loss", "max_attn_logit", "final_logz", "init_loss"):
            assert same_float(ra[field], rb[field]), (key, field, ra[field], rb[field])
    with RunStore(db_a) as sa, RunStore(db_b) as sb:  # every recorded series, step by step
        for key, ra in a.items():
            series_a, series_b = sa.all_series(ra["run_id"]), sb.all_series(b[key]["run_id"])
            assert series_a.keys() == series_b.keys()
            for name, (steps, values) in series_a.items():
                assert (steps == series_b[name][0]).all()
                assert all(same_float(x, y) for x, y in zip(values, series_b[name][1])), (key, name)


def test_one_and_two_workers_give_identical_results(one_worker, tmp_path):
    db = tmp_path / "seismo.sqlite"
    ids = run_sweep(tiny_sweep(), db, workers=2)
    assert len(ids) == 4
    assert_same_results(one_worker, db, "tiny", 4)
    rows = load_sweep_results(db, "tiny")
    assert all(r["status"] == "completed" and r["steps_done"] == 10 for r in rows)
    assert {r["max_attn_logit"] < 10 for r in rows if r["intervention"] == "qk_norm"} == {True}  # qk-LN bounds logits


def test_rerun_skips_every_finished_trial(tmp_path):
    db = tmp_path / "seismo.sqlite"
    sweep = tiny_sweep(lrs=[1e-2])
    first = run_sweep(sweep, db, workers=1)
    progress = []
    again = run_sweep(sweep, db, workers=2, on_progress=lambda *a: progress.append(a))
    assert len(first) == 2 and again == []
    assert progress == [(2, 2, 0, None)]  # all done before starting, nothing running
    with RunStore(db) as store:
        assert len(store.runs()) == 2
    # a larger grid over the same store runs only the new trials
    bigger = run_sweep(tiny_sweep(lrs=[1e-2, 1e-1]), db, workers=1)
    assert len(bigger) == 2
    assert len(load_sweep_results(db, "tiny")) == 4
    # the same name with other settings stores new trials beside the old; `keys` keeps one grid
    changed = tiny_sweep(lrs=[1e-2], overrides=TINY_RUN + ["steps=6"])
    assert len(run_sweep(changed, db, workers=1)) == 2
    assert len(load_sweep_results(db, "tiny")) == 6
    rows = load_sweep_results(db, "tiny", keys={t.key for t in expand(changed)})
    assert len(rows) == 2 and {r["steps_done"] for r in rows} == {6}


# --- kill -9 and resume through the real CLI -----------------------------------------------------

def session_pids(sid: int) -> dict[int, str]:
    """Live (non-zombie) processes of session ``sid``: pid -> command name."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name, fields = stat[stat.find("(") + 1 : stat.rfind(")")], stat[stat.rfind(")") + 2 :].split()
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            out[int(entry)] = name
    return out


def shm_files(pids) -> set[str]:
    """The /dev/shm files (multiprocessing's named semaphores) that these processes have mapped."""
    found = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        for line in maps.splitlines():
            fields = line.split(None, 5)  # address perms offset dev inode [path]
            if len(fields) == 6 and fields[5].startswith("/dev/shm/sem."):
                found.add(fields[5])
    return found


def kill_session(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGKILL the process group of ``proc`` (a session leader), then any process left in its
    session by pid (Ray starts a reaper that calls setpgrp), and wait until none is left.

    SIGKILL also kills multiprocessing's resource tracker, which would have unlinked the pool's
    named semaphores: remove the ones these processes had mapped (their names are random, so
    no other process uses them)."""
    leaked = shm_files(session_pids(proc.pid))
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while True:
        proc.poll()  # reap the driver so it does not linger as a zombie
        left = session_pids(proc.pid)
        if not left:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"processes survived SIGKILL of their session: {left}")
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    proc.wait(timeout=timeout)
    for path in leaked:
        Path(path).unlink(missing_ok=True)


def stored_runs(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
        try:
            return int(con.execute("SELECT count(*) FROM runs").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:  # not created yet, or busy for a moment
        return 0


def sweep_cmd(toml: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "seismo", "sweep", str(toml), "--workers", "2", "--out", str(out), *extra]


def kill_mid_sweep(cmd: list[str], db: Path, n_trials: int, env: dict, log: Path, expect: tuple[str, ...] = ()) -> int:
    """Start the CLI in its own session, SIGKILL the whole session as soon as a trial is stored;
    return how many trials were stored. ``expect``: command names that must be in the session."""
    seen: set[str] = set()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, start_new_session=True, stdout=fh, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 150
            while stored_runs(db) == 0:
                assert proc.poll() is None, f"the sweep ended before the kill:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no trial stored in time:\n{log.read_text()[-3000:]}"
                if expect:
                    seen.update(session_pids(proc.pid).values())
                time.sleep(0.02)
            seen.update(session_pids(proc.pid).values())
        finally:
            kill_session(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not session_pids(proc.pid)
    for name in expect:  # so the session kill reached them too
        assert name in seen, f"{name} was not in the driver's session: {sorted(seen)}"
    n = stored_runs(db)
    assert 0 < n < n_trials, f"the kill was meant to land mid-sweep; {n}/{n_trials} trials stored"
    return n


def resume(cmd: list[str], env: dict, timeout: float = 240.0) -> str:
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None or session_pids(proc.pid):
            kill_session(proc)
    assert proc.returncode == 0, out[-3000:]
    return out


def assert_each_trial_stored_once(db: Path, toml: Path) -> None:
    expected = {t.key for t in expand(load_sweep_file(toml))}
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        metas = [json.loads(m) for (m,) in con.execute("SELECT meta_json FROM runs")]
        orphans = con.execute("SELECT count(*) FROM metrics WHERE run_id NOT IN (SELECT run_id FROM runs)").fetchone()[0]
    finally:
        con.close()
    counts = collections.Counter(m["trial_key"] for m in metas)
    assert set(counts) == expected
    assert all(c == 1 for c in counts.values()), counts
    assert orphans == 0  # a killed write left no half-trial behind


@pytest.fixture(scope="module")
def kill_toml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("toml") / "kill.toml"
    path.write_text(KILL_TOML)
    return path


@pytest.fixture(scope="module")
def local_killed_and_resumed(kill_toml, tmp_path_factory):
    """The 8-trial sweep on the local backend, killed with SIGKILL mid-sweep, then resumed."""
    out = tmp_path_factory.mktemp("local")
    db, cmd, env = out / "seismo.sqlite", sweep_cmd(kill_toml, out), dict(os.environ, COLUMNS="200")
    n_killed = kill_mid_sweep(cmd, db, 8, env, out / "first.log")
    text = resume(cmd, env)
    return db, n_killed, text


@pytest.mark.skipif(not LINUX, reason="needs /proc (Linux)")
def test_kill9_and_resume_local_backend(local_killed_and_resumed, kill_toml):
    db, n_killed, text = local_killed_and_resumed
    assert_each_trial_stored_once(db, kill_toml)
    assert stored_runs(db) == 8
    assert "kill-test: LR sensitivity" in text
    # re-running it now does nothing
    assert run_sweep(load_sweep_file(kill_toml), db, workers=1) == []


# --- the Ray backend -------------------------------------------------------------------------------

def processes_with_env(entry: str) -> list[int]:
    """Pids whose environment (as started) contains ``entry``: everything Ray started for us."""
    found, needle = [], entry.encode() + b"\0"
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                if needle in Path(f"/proc/{pid}/environ").read_bytes():
                    found.append(int(pid))
            except OSError:
                pass
    return found


def wait_for_exit(entry: str, timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := processes_with_env(entry)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture
def ray_env():
    """Ray needs to be installed; its session files go to a private short temp dir (Unix socket
    paths are limited to ~107 bytes), so nothing is shared with other Ray users of the machine,
    and every process Ray starts for a test is found by that setting in its environment: the
    teardown kills leftovers by pid (never ``ray stop``, which would stop other users' Ray too)."""
    pytest.importorskip("ray")
    tmp = tempfile.mkdtemp(prefix="seismo-ray-", dir="/tmp")
    env = dict(os.environ, RAY_TMPDIR=tmp, COLUMNS="200", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    yield env
    if LINUX:
        for pid in processes_with_env(f"RAY_TMPDIR={tmp}"):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_for_exit(f"RAY_TMPDIR={tmp}", 10.0)
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.skipif(not LINUX, reason="needs /proc (Linux)")
def test_kill9_and_resume_ray_backend_matches_local(ray_env, kill_toml, local_killed_and_resumed, tmp_path):
    db, cmd = tmp_path / "seismo.sqlite", sweep_cmd(kill_toml, tmp_path, "--backend", "ray")
    # the driver started Ray itself: raylet and GCS are in its session, so killing the session kills them
    kill_mid_sweep(cmd, db, 8, ray_env, tmp_path / "first.log", expect=("raylet", "gcs_server"))
    text = resume(cmd, ray_env)
    assert "backend ray" in text and "kill-test: LR sensitivity" in text
    assert_each_trial_stored_once(db, kill_toml)
    assert wait_for_exit(f"RAY_TMPDIR={ray_env['RAY_TMPDIR']}") == []  # the resumed driver shut Ray down
    # every trial was computed by a Ray worker; the results equal the local backend's bitwise
    assert_same_results(local_killed_and_resumed[0], db, "kill-test", 8)


def test_ray_backend_matches_one_local_worker(ray_env, one_worker, tmp_path, monkeypatch):
    for key, value in ray_env.items():
        monkeypatch.setenv(key, value)
    # without --ray-address the sweep starts its own Ray, even when RAY_ADDRESS names a cluster
    # (ray.init() would join it and then reject num_cpus with a ValueError)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    db = tmp_path / "seismo.sqlite"
    done = []
    ids = run_sweep(tiny_sweep(), db, workers=2, backend="ray", on_progress=lambda *a: done.append(a[0]))
    assert len(ids) == 4 and done == [0, 1, 2, 3, 4]
    assert_same_results(one_worker, db, "tiny", 4)
    import ray

    assert not ray.is_initialized()  # the sweep shut down the Ray instance it started ...
    if LINUX:  # ... and every Ray process with it
        assert wait_for_exit(f"RAY_TMPDIR={ray_env['RAY_TMPDIR']}") == []


# --- pool workers die with the driver --------------------------------------------------------------

_POOL_PARENT = """
import concurrent.futures as cf, multiprocessing as mp, os, sys, time
from seismo.proxy.sweep import exit_with_parent
if __name__ == "__main__":
    kw = dict(initializer=exit_with_parent, initargs=(os.getpid(),)) if sys.argv[1] == "watch" else {}
    pool = cf.ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn"), **kw)
    futures = [pool.submit(time.sleep, 300) for _ in range(2)]
    while len(pool._processes) < 2:
        time.sleep(0.05)
    print(*pool._processes, flush=True)
    time.sleep(300)
"""


def _worker_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.skipif(not LINUX, reason="needs /proc (Linux)")
@pytest.mark.parametrize("mode", ["watch", "control"])
def test_pool_workers_exit_when_the_driver_is_killed(tmp_path, mode):
    """kill -9 of the driver: with ``exit_with_parent`` its workers are gone within seconds; the
    control (a pool without it) shows that they would otherwise keep running."""
    script = tmp_path / "parent.py"
    script.write_text(_POOL_PARENT)
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE, text=True, env=env)
    workers = [int(p) for p in proc.stdout.readline().split()]
    proc.kill()
    proc.wait()
    proc.stdout.close()
    try:
        assert len(workers) == 2 and all(_worker_alive(p) for p in workers)
        deadline = time.monotonic() + (10 if mode == "watch" else 2)
        while any(_worker_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        alive = [p for p in workers if _worker_alive(p)]
        assert alive == ([] if mode == "watch" else workers)
    finally:
        for pid in workers:  # the control's orphans, by pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
