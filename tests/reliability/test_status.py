"""Run status is always true (issue 16 item 2), and the smaller store/sweep cases of item 6.

Every way out of ``seismo.proxy.train`` and of a sweep trial stores what happened: ``failed`` with
the exception's one-line summary, ``interrupted`` for Ctrl-C and SIGTERM; a run whose process was
killed with ``kill -9`` is shown as ``stale`` once its heartbeat is older than the threshold.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from seismo.errors import ConfigError
from seismo.proxy.sweep import SweepConfig, run_sweep
from seismo.proxy.train import TrainConfig, train
from seismo.store import RunStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the modules, not the functions that seismo.proxy re-exports under the same names
train_mod = importlib.import_module("seismo.proxy.train")
sweep_mod = importlib.import_module("seismo.proxy.sweep")

REPO_ROOT = Path(__file__).resolve().parents[2]
TEXT = (" ".join(["the model loss spike attention logit norm grad adam step warm up decay layer head token."] * 400)).encode()


@pytest.fixture
def corpus(tmp_path: Path) -> str:
    path = tmp_path / "corpus.txt"
    path.write_bytes(TEXT)
    return str(path)


def small_cfg(corpus: str, tmp_path: Path, **kw) -> TrainConfig:
    """d=32, 1 layer, T=16, B=4 on a fixed text, minimal monitor, a run dir and a store."""
    cfg = TrainConfig(steps=40, batch_size=4, eval_every=0, eval_batches=1, log_every=5, monitor="minimal", diagnose=False,
                      out_dir=str(tmp_path / "runs" / "r"), run_name="r")
    cfg.data.source, cfg.data.path = "text", corpus
    cfg.model.n_embd, cfg.model.n_head, cfg.model.n_layer, cfg.model.block_size = 32, 2, 1, 16
    cfg.optim.warmup_steps = 5
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def stored(tmp_path: Path):
    with RunStore(tmp_path / "runs" / "seismo.sqlite") as store:
        return store.runs()


def test_exception_in_training_stores_failed_with_its_one_line_summary(corpus, tmp_path, monkeypatch):
    real_load = train_mod.load_dataset

    def load_failing(cfg):
        ds = real_load(cfg)
        real_batch = ds.batch

        def batch(split, seed, step, *args, **kwargs):
            if split == "train" and step == 7:
                raise RuntimeError("disk on fire\nsecond line of detail")
            return real_batch(split, seed, step, *args, **kwargs)

        ds.batch = batch
        return ds

    monkeypatch.setattr(train_mod, "load_dataset", load_failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        train(small_cfg(corpus, tmp_path))
    (run,) = stored(tmp_path)
    assert (run.status, run.recorded_status) == ("failed", "failed")
    assert run.meta["error"] == "RuntimeError: disk on fire"  # one line: the second is dropped
    assert run.meta["steps_done"] == 7
    result = json.loads((tmp_path / "runs" / "r" / "result.json").read_text())
    assert result["status"] == "failed" and result["error"] == "RuntimeError: disk on fire"


def test_learning_rate_that_overflows_adam_stores_failed(corpus, tmp_path):
    # Adam's first step size lr / (1 - beta1) = 1e309 is inf in a double: AdamW refuses it.
    with pytest.raises(RuntimeError, match="overflow"):
        _train_lr(corpus, tmp_path, 1e308)
    (run,) = stored(tmp_path)
    assert run.status == "failed" and run.meta["error"].startswith("RuntimeError: value cannot be converted")


def _train_lr(corpus, tmp_path, lr):
    cfg = small_cfg(corpus, tmp_path, steps=5)
    cfg.optim.lr, cfg.optim.warmup_steps = lr, 0
    return train(cfg)


def test_ctrl_c_stores_interrupted(corpus, tmp_path):
    def on_log(step, info):
        if step == 19:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(small_cfg(corpus, tmp_path), on_log=on_log)
    (run,) = stored(tmp_path)
    assert run.status == "interrupted" and run.meta["error"] == "KeyboardInterrupt" and run.meta["steps_done"] == 20


def test_sigterm_handler_is_set_only_while_training_and_restored(corpus, tmp_path):
    def previous(signum, frame):  # a handler of the embedding application
        pass

    seen = []
    old = signal.signal(signal.SIGTERM, previous)
    try:
        train(small_cfg(corpus, tmp_path, steps=10), on_log=lambda step, info: seen.append(signal.getsignal(signal.SIGTERM)))
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, old)
    assert seen and all(h is not previous and callable(h) for h in seen)

    # In another thread signals cannot be handled: training works and leaves the handler alone.
    out: list = []
    thread = threading.Thread(target=lambda: out.append(train(small_cfg(corpus, tmp_path / "t", steps=10)).status))
    thread.start()
    thread.join()
    assert out == ["completed"]


_TRAIN_CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[3])
    from test_status import small_cfg
    from pathlib import Path
    cfg = small_cfg(sys.argv[1], Path(sys.argv[2]), steps=100000, log_every=1)
    from seismo.proxy.train import train
    train(cfg)
    """
)


def _start_training(corpus: str, tmp_path: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.Popen([sys.executable, "-c", _TRAIN_CHILD, corpus, str(tmp_path), str(Path(__file__).parent)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_rows(tmp_path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    path = tmp_path / "runs" / "seismo.sqlite"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        if path.exists():
            with RunStore(path) as store:
                runs = store.runs()
                if runs and len(store.series(runs[0].run_id, "loss")[0]) >= 3:
                    return
        time.sleep(0.2)
    raise AssertionError("the training process wrote no rows")


def test_sigterm_stores_interrupted(corpus, tmp_path):
    proc = _start_training(corpus, tmp_path)
    try:
        _wait_for_rows(tmp_path, proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode != 0
    (run,) = stored(tmp_path)
    assert run.status == "interrupted"
    assert run.meta["error"] == f"Terminated: terminated by signal {int(signal.SIGTERM)}"


def test_kill_9_shows_the_run_as_stale_in_seismo_runs(corpus, tmp_path, monkeypatch, capsys):
    from seismo.cli import main

    proc = _start_training(corpus, tmp_path)
    try:
        _wait_for_rows(tmp_path, proc)
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stderr.close()
    (run,) = stored(tmp_path)
    assert run.status == "running"  # killed a moment ago: not yet distinguishable from a slow writer
    monkeypatch.setattr("seismo.store.records.STALE_AFTER_S", 0.5)
    time.sleep(1.0)
    (run,) = stored(tmp_path)
    assert (run.status, run.recorded_status) == ("stale", "running")
    main(["runs", "--store", str(tmp_path / "runs" / "seismo.sqlite")])
    out = capsys.readouterr().out
    assert "stale" in out and "running" not in out


def test_resume_of_a_finished_run_is_refused_and_leaves_its_result(corpus, tmp_path):
    cfg = small_cfg(corpus, tmp_path, steps=10, checkpoint_every=5)
    r = train(cfg)
    assert r.status == "completed"
    result = tmp_path / "runs" / "r" / "result.json"
    before = result.read_bytes()
    assert json.loads(before)["max_attn_logit"] is not None
    with pytest.raises(ConfigError, match="already finished"):
        train(cfg, resume=True)
    assert result.read_bytes() == before
    assert [(x.name, x.status) for x in stored(tmp_path)] == [("r", "completed")]


def test_failed_sweep_trial_is_stored_failed_then_retried_in_its_place(tmp_path, monkeypatch, corpus):
    sweep = SweepConfig(name="s", base="tiny", lrs=[1e-3, 2e-3], overrides=[
        "steps=4", "eval_every=0", "log_every=2", "monitor=minimal", "diagnose=false", "data.source=text", f"data.path={corpus}",
        "model.n_embd=32", "model.n_head=2", "model.n_layer=1", "model.block_size=16", "batch_size=4"])
    real_train = sweep_mod.train

    def flaky(cfg, **kw):
        if cfg.optim.lr == 2e-3:
            raise MemoryError("out of memory in trial")
        return real_train(cfg, **kw)

    store = tmp_path / "sweep.sqlite"
    monkeypatch.setattr(sweep_mod, "train", flaky)
    first_ids = run_sweep(sweep, store, workers=1)
    with RunStore(store) as s:
        runs = {r.meta["lr"]: r for r in s.runs()}
    assert len(first_ids) == 2
    assert runs[1e-3].status == "completed"
    assert runs[2e-3].status == "failed" and runs[2e-3].meta["error"] == "MemoryError: out of memory in trial"

    monkeypatch.setattr(sweep_mod, "train", real_train)
    (retried,) = run_sweep(sweep, store, workers=1)  # the completed trial is skipped, the failed one re-run
    with RunStore(store) as s:
        after = s.runs()
    assert sorted((r.meta["lr"], r.status) for r in after) == [(1e-3, "completed"), (2e-3, "completed")]
    assert {r.run_id for r in after if r.meta["lr"] == 2e-3} == {retried}  # the failed attempt is gone
