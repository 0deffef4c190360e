"""The Guard (seismo.mitigate.guard): skip steps, roll back past bad data, resume, give up.

* skip: a skipped step leaves parameters AND optimizer state (moments, step counter) bitwise
  unchanged, in every skip mode (host-synced, snapshot+where mask, fused found_inf); a run with
  no spikes is bitwise identical to the plain loop; a spike is kept out of the window;
* the device-side robust z-score window is checked against a slow NumPy reference;
* rollback on TinyGPT with a corrupted data window ends where a run that never saw the skipped
  batches ends (bitwise here, and within the 2% the spec asks for);
* a new Guard on the same ckpt_dir resumes the tracker (ranges, LR factor) and reproduces the
  uninterrupted run bitwise; kill -9 during snapshot writes leaves a loadable snapshot;
* after the retry cap the Guard raises GuardGaveUp naming the spike; events reach the run store.
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from seismo.errors import ConfigError
from seismo.mitigate.guard import (
    GUARD_KINDS,
    TRACKER_NAME,
    Guard,
    GuardConfig,
    GuardGaveUp,
    GuardWarning,
    data_index,
)
from seismo.mitigate.guard.window import SpikeWindow

MODES = ("sync", "mask", "fused")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _quiet_guard():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GuardWarning)
        yield


# --- a small regression loop ----------------------------------------------------------------
def make_mlp(fused: bool = False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=fused)
    return model, opt


def mlp_batch(i: int):
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(16, 8, generator=g)
    return x, x.sum(1, keepdim=True).sin() + 0.1 * torch.randn(16, 1, generator=g)


def snapshot(model, opt):
    return copy.deepcopy([p.detach() for p in model.parameters()]), copy.deepcopy(opt.state_dict()["state"])


def assert_same(a, b):
    (pa, sa), (pb, sb) = a, b
    assert all(torch.equal(x, y) for x, y in zip(pa, pb)), "parameters differ"
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for n in sa[k]:
            assert torch.equal(sa[k][n], sb[k][n]), f"optimizer state {k}/{n} differs"


def plain_run(n: int, fused: bool = False, spikes: dict | None = None, clip: float = 0.0):
    """The loop without a Guard; steps listed in ``spikes`` are left out (no optimizer.step)."""
    model, opt = make_mlp(fused)
    for i in range(n):
        x, y = mlp_batch(i)
        loss = F.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if not spikes or i not in spikes:
            opt.step()
    return model, opt


def guarded_run(n: int, mode: str, spikes: dict | None = None, check_unchanged: bool = False, **kw):
    model, opt = make_mlp(mode == "fused")
    guard = Guard(model, opt, policy="skip", skip_mode=mode, **kw)
    for i in guard.steps(n):
        x, y = mlp_batch(i)
        loss = F.mse_loss(model(x), y)
        kind = (spikes or {}).get(i)
        if kind == "nan":
            loss = loss * float("nan")
        elif kind == "x1000":
            loss = loss * 1000.0
        loss.backward()
        before = snapshot(model, opt) if kind and check_unchanged else None
        guard.step(loss)
        if before is not None:
            assert_same(snapshot(model, opt), before)
    guard.flush()
    return model, opt, guard


# --- skip ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_no_spike_run_is_bitwise_identical_to_plain_loop(mode):
    ref = plain_run(40, fused=mode == "fused")
    model, opt, guard = guarded_run(40, mode)
    assert guard.skip_mode == mode
    assert guard.stats["skipped_steps"] == 0
    assert_same(snapshot(model, opt), snapshot(*ref))


def test_clipping_by_the_guard_matches_clip_grad_norm():
    ref = plain_run(30, clip=0.05)
    model, opt, guard = guarded_run(30, "sync", max_grad_norm=0.05)
    assert_same(snapshot(model, opt), snapshot(*ref))


@pytest.mark.parametrize("mode", MODES)
def test_skipped_step_leaves_params_and_adam_state_bitwise_unchanged(mode):
    spikes = {25: "nan", 35: "x1000"}
    model, opt, guard = guarded_run(60, mode, spikes, check_unchanged=True)
    # exactly the two injected steps were skipped: the step after a spike is not flagged
    assert guard.stats["skipped_steps"] == 2
    assert [(e.kind, e.step) for e in guard.events] == [("guard_skip", 25), ("guard_skip", 35)]
    assert guard.events[0].evidence["reasons"] == ["nonfinite_loss", "nonfinite_grad"]
    assert set(guard.events[1].evidence["reasons"]) == {"loss_spike", "grad_spike"}
    # the spikes never entered the window: 58 accepted values, none of them huge
    assert int(guard._window.count) == 58
    filled = guard._window.buf[:, :58]
    assert torch.isfinite(filled).all() and float(filled[0].max()) < 5  # the x1000 loss (~500) is not in it
    assert torch.isnan(guard._window.buf[:, 58:]).all()
    # every other step was applied exactly as the plain loop applies it
    ref = plain_run(60, fused=mode == "fused", spikes=spikes)
    assert_same(snapshot(model, opt), snapshot(*ref))
    # AdamW's step counter did not advance on the skipped steps
    assert all(float(s["step"]) == 58 for s in opt.state_dict()["state"].values())


def test_skip_is_logged_not_warned_and_returns_the_decision_as_a_tensor(caplog):
    model, opt = make_mlp()
    guard = Guard(model, opt, policy="skip")
    decisions = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skip is an event, never a warning
        with caplog.at_level("WARNING", logger="seismo.guard"):
            for i in guard.steps(32):
                x, y = mlp_batch(i)
                loss = F.mse_loss(model(x), y) * (float("inf") if i == 30 else 1.0)
                loss.backward()
                decisions.append(guard.step(loss))
    (rec,) = [r for r in caplog.records if r.name == "seismo.guard"]
    assert rec.levelname == "WARNING"
    assert "skipped step 30 (data index 30): non-finite loss" in rec.getMessage()
    assert rec.seismo_event.kind == "guard_skip" and rec.seismo_event is guard.events[0]
    assert all(isinstance(d, torch.Tensor) and d.dtype == torch.bool and d.dim() == 0 for d in decisions)
    assert [bool(d) for d in decisions].index(True) == 30 and sum(bool(d) for d in decisions) == 1


def _reference_flags(xs: np.ndarray, window: int, warmup: int, z: float, min_jump: float) -> list[bool]:
    """Slow reference of the rule on one signal: lower median / MAD of the accepted values."""
    acc: list[np.float32] = []
    out = []
    for x in xs.astype(np.float32):
        flag = not np.isfinite(x)
        w = np.array(acc[-window:], dtype=np.float32)
        if not flag and len(w) >= warmup:
            med = np.sort(w)[(len(w) - 1) // 2]
            dev = np.abs(w - med)
            mad = np.sort(dev)[(len(dev) - 1) // 2]
            scale = max(np.float32(1.4826) * mad, np.float32(1e-3) * abs(med), np.float32(1e-12))
            flag = bool((x - med) / scale > z and (x - med) > min_jump * abs(med))
        out.append(flag)
        if not flag:
            acc.append(x)
    return out


def test_spike_window_matches_slow_reference():
    rng = np.random.default_rng(0)
    n = 400
    xs = 2.0 + 0.05 * rng.standard_normal(n) - np.linspace(0, 0.5, n)
    spikes = rng.choice(np.arange(30, n), size=25, replace=False)
    xs[spikes] += rng.uniform(0.2, 3.0, size=25)  # some small (not flagged), some large
    xs[[50, 51, 52]] = [np.nan, np.inf, 10.0]
    cfg = GuardConfig(window=64, warmup=20, z=6.0, loss_min_jump=0.05, watch_grad_norm=False)
    win = SpikeWindow(cfg)
    got = []
    for x in xs:
        vals = torch.tensor([x, 1.0], dtype=torch.float32)
        flags, _, _ = win.decide(vals)
        skip = flags.amax() > 0
        win.accept(~skip, vals)
        got.append(bool(skip))
    want = _reference_flags(xs, 64, 20, 6.0, 0.05)
    assert got == want
    assert 5 < sum(want) < 30  # the test exercises both outcomes


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(1, 15)), max_size=5), st.integers(0, 80))
def test_data_index_jumps_over_the_skipped_ranges(raw, n):
    ranges: list[list[int]] = []
    for a, length in sorted(raw):
        if ranges and a <= ranges[-1][1]:
            continue
        ranges.append([a, a + length])
    allowed = [i for i in range(400) if not any(a <= i < b for a, b in ranges)]
    assert [data_index(t, ranges) for t in range(n)] == allowed[:n]


# --- TinyGPT rollback ------------------------------------------------------------------------
BAD = range(40, 60)  # data indices whose batches are corrupted: the loss explodes and stays up
TG_STEPS = 100


@pytest.fixture(scope="module")
def tinygpt():
    from seismo.proxy.data import load_dataset
    from seismo.proxy.model import TinyGPT
    from seismo.proxy.presets import tiny

    cfg = tiny()
    cfg.data.max_bytes = 200_000
    ds = load_dataset(cfg.data)
    cfg.model.vocab_size = ds.vocab_size
    cfg.model.dropout = 0.1  # uses the RNG, so a rollback must restore it

    def build():
        torch.manual_seed(0)
        model = TinyGPT(cfg.model)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
        return model, opt

    def batch(d: int):
        x, y = ds.batch("train", 0, d, 8, 64)
        if d in BAD:  # random targets: cross-entropy jumps from ~3 to ~8
            y = torch.randint(0, 256, y.shape, generator=torch.Generator().manual_seed(d))
        return x, y

    def eval_loss(model) -> float:
        model.eval()
        with torch.no_grad():
            v = sum(float(model(*ds.batch("val", 0, i, 8, 64))[1]) for i in range(4)) / 4
        model.train()
        return v

    return build, batch, eval_loss


def run_guarded(tinygpt, ckpt_dir, stop_after: int | None = None, resume: bool = False, **kw):
    build, batch, _ = tinygpt
    model, opt = build()
    guard = Guard(model, opt, ckpt_dir=ckpt_dir, interval=10, disk_interval=10, rewind=10, skip_ahead=20, **kw)
    if resume:
        guard.resume()
    model.train()
    for i in guard.steps(TG_STEPS):
        _, loss = model(*batch(i))
        loss.backward()
        guard.step(loss)
        if stop_after is not None and guard._iteration >= stop_after:
            guard._writer.drain()  # the "crash" happens after the last snapshot landed
            return model, opt, guard
    guard.close()
    return model, opt, guard


def test_rollback_skips_the_bad_window_and_ends_like_a_run_that_never_saw_it(tinygpt, tmp_path):
    build, batch, eval_loss = tinygpt
    model, opt, guard = run_guarded(tinygpt, tmp_path / "guard")
    st_ = guard.stats
    assert st_["rollbacks"] == 1 and st_["skipped_steps"] == 5  # 5 consecutive skips, then the rollback
    (rb,) = guard.rollbacks
    assert rb["spike_step"] == rb["spike_data_index"] == BAD[0]
    assert rb["reasons"] == ["loss_spike"]
    assert rb["restored_step"] == 30  # newest checkpoint >= rewind (10) steps before the spike
    # the tracker on disk records the skipped range; it covers the whole corrupted window
    tracker = json.loads((tmp_path / "guard" / TRACKER_NAME).read_text())
    a, b = tracker["rollbacks"][0]["skipped_range"]
    assert tracker["skipped_ranges"] == [[a, b]] == [[30, 45 + 20]]
    assert a <= BAD[0] and b >= BAD[-1] + 1
    assert tracker["stats"]["rollbacks"] == 1

    # reference: a plain loop whose data schedule skips the recorded range from the start
    ref, ref_opt = build()
    ref.train()
    for t in range(TG_STEPS):
        _, loss = ref(*batch(data_index(t, tracker["skipped_ranges"])))
        ref_opt.zero_grad(set_to_none=True)
        loss.backward()
        ref_opt.step()
    lg, lr_ = eval_loss(model), eval_loss(ref)
    assert lg == pytest.approx(lr_, rel=0.02)
    # exact restore (model, AdamW state, RNG for dropout, detector window): bitwise equal
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


def test_restart_resumes_the_tracker_and_reproduces_the_run(tinygpt, tmp_path):
    full_model, full_opt, full = run_guarded(tinygpt, tmp_path / "a", rollback_lr_factor=0.5)
    assert full.lr_factor == 0.5 and full.stats["rollbacks"] == 1
    assert full_opt.param_groups[0]["lr"] == 3e-3  # the loop's LR is left alone; the step uses lr * 0.5

    # the same job, killed 75 iterations in (the rollback happened at iteration 45: step 60 now)
    _, _, crashed = run_guarded(tinygpt, tmp_path / "b", stop_after=75, rollback_lr_factor=0.5)
    assert crashed.step_count == 60
    # a fresh Guard on that directory must resume, not silently start over
    with pytest.raises(FileExistsError, match="resume"):
        run_guarded(tinygpt, tmp_path / "b", rollback_lr_factor=0.5)

    build, _, _ = tinygpt
    model, opt = build()
    guard = Guard(model, opt, ckpt_dir=tmp_path / "b", interval=10, disk_interval=10, rewind=10, skip_ahead=20,
                  rollback_lr_factor=0.5)
    assert guard.resume() == 60
    assert guard.lr_factor == 0.5
    assert guard.skipped_ranges == full.skipped_ranges == [(30, 65)]
    assert guard.data_index == data_index(60, [(30, 65)]) == 95
    assert [r["skipped_range"] for r in guard.rollbacks] == [r["skipped_range"] for r in full.rollbacks]

    _, resumed_opt, resumed = run_guarded(tinygpt, tmp_path / "b", resume=True, rollback_lr_factor=0.5)
    assert resumed.stats["rollbacks"] == 1  # no new rollback: the corrupted data stays skipped
    assert_same(snapshot(resumed.model, resumed_opt), snapshot(full_model, full_opt))


# --- giving up, events ----------------------------------------------------------------------
def _run_until_give_up(guard, model, bad_from: int, n: int = 200, factor: float = 1000.0, grad_only: bool = False):
    """From data index ``bad_from`` on, the loss (and so the gradient) is multiplied by ``factor``;
    with ``grad_only`` the Guard is shown the true loss (only the gradient norm jumps)."""
    for i in guard.steps(n):
        x, y = mlp_batch(i)
        loss = F.mse_loss(model(x), y)
        scaled = loss * (factor if i >= bad_from else 1.0)
        scaled.backward()
        guard.step(loss if grad_only else scaled)


def test_rollback_restores_from_disk_when_the_ring_is_too_short(tmp_path):
    def run(ckpt_dir, **kw):
        model, opt = make_mlp()
        guard = Guard(model, opt, ckpt_dir=ckpt_dir, interval=10, disk_interval=10, rewind=10, skip_ahead=25, **kw)
        for i in guard.steps(80):
            x, y = mlp_batch(i)
            loss = F.mse_loss(model(x), y) * (1000.0 if 40 <= i < 60 else 1.0)
            loss.backward()
            guard.step(loss)
        guard.close()
        return model, opt, guard

    ring_model, ring_opt, ring = run(tmp_path / "ring", ring_size=4, disk_keep=1)
    disk_model, disk_opt, disk = run(tmp_path / "disk", ring_size=1, disk_keep=3)  # the ring only holds step 40
    assert ring.rollbacks[0]["restored_step"] == disk.rollbacks[0]["restored_step"] == 30
    assert disk.skipped_ranges == ring.skipped_ranges == [(30, 70)]
    assert_same(snapshot(disk_model, disk_opt), snapshot(ring_model, ring_opt))


def test_gives_up_after_the_retry_cap_with_a_diagnosis(tmp_path):
    from seismo.store import RunStore

    store = tmp_path / "runs.sqlite"
    with RunStore(store) as s:
        run_id = s.create_run("guarded")
    model, opt = make_mlp()
    guard = Guard(model, opt, ckpt_dir=tmp_path / "g", store=str(store), run_id=run_id, interval=10,
                  disk_interval=20, rewind=5, skip_ahead=5, max_rollbacks=2)
    with pytest.raises(GuardGaveUp) as info:
        _run_until_give_up(guard, model, bad_from=30)
    err = info.value
    msg = str(err)
    assert "gave up" in msg and "loss spike" in msg and "grad-norm spike" in msg
    assert "after 2 rollback(s)" in msg and "max_rollbacks=2" in msg
    assert "rollback #1" in msg and "rollback #2" in msg
    assert err.reasons == ["loss_spike", "grad_spike"] and len(err.rollbacks) == 2
    assert err.data_index >= 30
    with pytest.raises(GuardGaveUp):  # it stays stopped
        guard.step(torch.tensor(1.0))
    tracker = json.loads((tmp_path / "g" / TRACKER_NAME).read_text())
    assert tracker["gave_up"] == msg and len(tracker["rollbacks"]) == 2
    with RunStore(store) as s:
        kinds = [e["kind"] for e in s.events(run_id)]
    assert set(kinds) == {"guard_skip", "guard_rollback", "guard_gave_up"} <= set(GUARD_KINDS)
    assert kinds.count("guard_rollback") == 2 and kinds[-1] == "guard_gave_up"


def test_skip_policy_gives_up_on_lasting_nonfinite_values():
    model, opt = make_mlp()
    guard = Guard(model, opt, policy="skip", max_consecutive_skips=4)
    with pytest.raises(GuardGaveUp, match=r"(?s)non-finite loss.*did not recover \(4 consecutive skipped steps\)"
                                          r".*policy 'skip'"):
        _run_until_give_up(guard, model, bad_from=30, factor=float("nan"))
    assert guard.stats["rollbacks"] == 0 and guard.stats["skipped_steps"] == 4


@pytest.mark.parametrize("policy", ["skip", "rollback"])
def test_a_lasting_grad_norm_shift_is_accepted_not_rolled_back(policy):
    """Skipped steps freeze the parameters, so a jump of the gradient norm caused by the state
    never goes away by skipping; with a healthy loss the Guard restarts its window and goes on."""
    model, opt = make_mlp()
    guard = Guard(model, opt, policy=policy, interval=10)
    _run_until_give_up(guard, model, bad_from=30, n=80, factor=1e4, grad_only=True)
    guard.flush()
    st_ = guard.stats
    assert st_["rollbacks"] == 0 and st_["window_resets"] == 1 and st_["skipped_steps"] == 5
    resets = [e for e in guard.events if e.kind == "guard_reset"]
    assert [(e.step, e.evidence["spike_step"], e.evidence["reasons"]) for e in resets] == [(34, 30, ["grad_spike"])]
    assert guard.step_count == 80  # no rewind


def test_skip_policy_accepts_a_lasting_loss_shift_and_says_so(caplog):
    model, opt = make_mlp()
    guard = Guard(model, opt, policy="skip")
    with caplog.at_level("WARNING", logger="seismo.guard"):
        _run_until_give_up(guard, model, bad_from=30, n=80)
    (reset,) = [r for r in caplog.records if r.seismo_event.kind == "guard_reset"]
    assert "did not recover (5 consecutive skipped steps); policy 'skip' cannot undo" in reset.getMessage()
    assert guard.stats["window_resets"] == 1 and guard.stats["skipped_steps"] == 5


def test_monitor_receives_guard_events(tmp_path):
    from seismo.monitor import Monitor
    from seismo.store import load_run

    model, opt = make_mlp()
    store = tmp_path / "runs.sqlite"
    mon = Monitor(model, opt, store=str(store), run_name="m", probes="minimal", flush_every=10)
    guard = Guard(model, opt, policy="skip", monitor=mon)
    for i in guard.steps(30):
        x, y = mlp_batch(i)
        loss = F.mse_loss(model(x), y) * (float("nan") if i == 25 else 1.0)
        loss.backward()
        guard.step(loss)
        mon.step(loss)
    guard.close()
    mon.close()
    events = load_run(str(store), mon.run_id).events
    assert [(e["kind"], e["step"]) for e in events if e["kind"].startswith("guard")] == [("guard_skip", 25)]


@pytest.mark.parametrize("field, value, match", [
    ("policy", "pray", r"GuardConfig\.policy: must be one of \('skip', 'rollback'\), got 'pray'"),
    ("window", 3, r"GuardConfig\.window: must be >= 4, got 3"),
    ("window", 10.0, r"GuardConfig\.window: must be an integer >= 1, got 10\.0"),
    ("warmup", 200, r"GuardConfig\.warmup: must be <= window \(128\), got 200"),
    ("z", float("nan"), r"GuardConfig\.z: must be a finite number > 0, got nan"),
    ("z", "6", r"GuardConfig\.z: must be a finite number > 0, got '6'"),
    ("rollback_lr_factor", 0.0, r"GuardConfig\.rollback_lr_factor: must be in \(0, 1\]"),
    ("disk_interval", 75, r"GuardConfig\.disk_interval: must be a multiple of interval \(50\), got 75"),
    ("max_grad_norm", -1.0, r"GuardConfig\.max_grad_norm: must be a finite number >= 0"),
    ("zero_grad", 1, r"GuardConfig\.zero_grad: must be True or False, got 1"),
])
def test_config_is_validated_at_construction_naming_the_field(field, value, match):
    import dataclasses

    with pytest.raises(ConfigError, match=match):
        GuardConfig(**{field: value})
    with pytest.raises(ConfigError, match=match):  # replace() builds a new config: validated too
        dataclasses.replace(GuardConfig(), **{field: value})
    model, opt = make_mlp()
    with pytest.raises(ConfigError, match=match):
        Guard(model, opt, **{field: value})
    assert issubclass(ConfigError, ValueError)
    assert not hasattr(GuardConfig, "validate")


def test_guard_options_are_checked_at_construction():
    model, opt = make_mlp()
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['windw'\]"):
        Guard(model, opt, windw=10)
    with pytest.raises(ConfigError, match=r"skip_mode: 'fused' needs a torch optimizer built with fused=True"):
        Guard(model, opt, skip_mode="fused")  # known before the first step
    with pytest.raises(ConfigError, match=r"run_id: a Guard with store= needs run_id"):
        Guard(model, opt, store="runs.sqlite")
    with pytest.raises(ConfigError, match=r"stateful\['sched'\]: needs state_dict\(\) and load_state_dict\(\), got int"):
        Guard(model, opt, stateful={"sched": 3})


# --- crash safety ------------------------------------------------------------------------------
_WRITER = textwrap.dedent("""
    import sys, torch
    from seismo.mitigate.guard import Guard
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Linear(700, 700)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    guard = Guard(model, opt, ckpt_dir=sys.argv[1], interval=1, disk_interval=1, disk_keep=2)
    for i in guard.steps(100_000):
        g = torch.Generator().manual_seed(i)
        loss = model(torch.randn(4, 700, generator=g)).square().mean()
        loss.backward()
        guard.step(loss)
""")


def _replay(steps: int):
    torch.manual_seed(0)
    model = torch.nn.Linear(700, 700)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        model(torch.randn(4, 700, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


def test_kill_9_during_snapshot_writes_leaves_a_loadable_snapshot(tmp_path):
    rng = random.Random(0)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for trial in range(2):
        d = tmp_path / f"t{trial}"
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(d)], env=env)
        try:
            deadline = time.time() + 60
            while not any(n.endswith(".pt") for n in (os.listdir(d) if d.exists() else [])):
                assert time.time() < deadline and proc.poll() is None, "the writer never wrote a snapshot"
                time.sleep(0.02)
            time.sleep(rng.uniform(0.1, 0.6))
            # kill while a snapshot is being written: its temporary file exists
            while not any(n.endswith(".tmp") for n in os.listdir(d)):
                assert time.time() < deadline and proc.poll() is None, "no snapshot write to interrupt"
                time.sleep(0.001)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        for name in os.listdir(d):  # every complete file loads safely
            if name.endswith(".pt"):
                torch.load(d / name, map_location="cpu", weights_only=True)
        torch.manual_seed(0)
        model = torch.nn.Linear(700, 700)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        guard = Guard(model, opt, ckpt_dir=d, interval=1, disk_interval=1)
        step = guard.resume()
        assert step > 0
        assert not any(n.endswith(".tmp") for n in os.listdir(d))
        assert_same(snapshot(model, opt), snapshot(*_replay(step)))


def _run_with_outliers(bad: set[int], n: int = 120) -> dict:
    """The regression loop with the loss (and gradient) of the batches in ``bad`` multiplied by 50."""
    model, opt = make_mlp()
    guard = Guard(model, opt, interval=10)
    for i in guard.steps(n):
        x, y = mlp_batch(i)
        loss = F.mse_loss(model(x), y) * (50.0 if i in bad else 1.0)
        loss.backward()
        guard.step(loss)
    guard.flush()
    return dict(guard.stats)


@pytest.mark.parametrize("bad", [{40, 60}, {40, 59}, {40, 45}, {40, 41, 60}], ids=["20-apart", "19-apart", "5-apart", "burst+1"])
def test_two_isolated_outliers_are_skipped_never_rolled_back(bad):
    """Two bursts of outliers are two skips, however close (recovery_steps = 20 once made the second
    of two one-step outliers 20 steps apart a rollback)."""
    st_ = _run_with_outliers(bad)
    assert st_["rollbacks"] == 0 and st_["skipped_steps"] == len(bad)


def test_a_spike_that_keeps_coming_back_is_rolled_back():
    """Three bursts spanning recovery_steps: the third one escalates (the loss spike lasts)."""
    st_ = _run_with_outliers({40, 50, 60})
    assert st_["rollbacks"] == 1 and st_["skipped_steps"] == 3
    assert _run_with_outliers({40, 50, 59})["rollbacks"] == 0  # the third burst before recovery_steps: skipped
