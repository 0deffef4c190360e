"""Spike autopsy: replay mapping, SPAM clipping and the verdict against hand computations, then
injected spikes whose cause is known (a poisoned batch, an LR burst, a state-caused blow-up)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from seismo._io import atomic_torch_save
from seismo.cli import main
from seismo.errors import ConfigError
from seismo.proxy.autopsy import autopsy, autopsy_run, choose_checkpoint
from seismo.proxy.autopsy_replay import ReplaySpec, data_index, spam_clip_
from seismo.proxy.autopsy_verdict import analyse
from seismo.proxy.presets import get_preset
from seismo.proxy.train import archive_checkpoint, checkpoint_history, poison_batch, train
from seismo.store import RunStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# --- pieces, against hand computations ----------------------------------------------------------


def test_data_index_maps_each_replay_to_the_batches_it_trains_on():
    same, other = ReplaySpec("same data"), ReplaySpec("other data", data="other")
    reorder, skip = ReplaySpec("reordered data", data="reorder"), ReplaySpec("skip", data="skip")
    # window: steps 10..14 (the spike at 14), skip the batches 12..14
    assert [data_index(same, s, 10, 14, 12, 1000) for s in range(10, 17)] == [10, 11, 12, 13, 14, 15, 16]
    assert [data_index(other, s, 10, 14, 12, 1000) for s in range(10, 17)] == [1010, 1011, 1012, 1013, 1014, 15, 16]
    assert [data_index(reorder, s, 10, 14, 12, 1000) for s in range(10, 17)] == [14, 13, 12, 11, 10, 15, 16]
    assert [data_index(skip, s, 10, 14, 12, 1000) for s in range(10, 17)] == [10, 11, 15, 16, 17, 18, 19]


def test_spam_clip_caps_entries_above_threshold_times_v():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.AdamW([p])
    opt.state[p]["exp_avg_sq"] = torch.tensor([1.0, 4.0, 0.25, 1.0])
    p.grad = torch.tensor([3.0, -10.0, 0.5, -1.0])
    n = spam_clip_(opt, 4.0)  # bound sqrt(4 v) = [2, 4, 1, 2]
    assert n == 2
    assert p.grad.tolist() == [2.0, -4.0, 0.5, -1.0]


def test_choose_checkpoint_takes_the_newest_at_least_window_steps_before():
    assert choose_checkpoint([0, 10, 20, 30], 35, 10) == 20
    assert choose_checkpoint([0, 10, 20, 30], 40, 10) == 30
    with pytest.raises(ConfigError, match="no checkpoint at least 10 steps before step 5"):
        choose_checkpoint([0, 10], 5, 10)


def test_archive_keeps_the_newest_checkpoints(tmp_path):
    ck = tmp_path / "checkpoint.pt"
    for step in (0, 10, 20, 30, 40):
        atomic_torch_save({"step": step}, ck)  # as train() writes it: a new file renamed over the old one
        archive_checkpoint(ck, step, keep=3)
    kept = checkpoint_history(tmp_path)
    assert sorted(kept) == [20, 30, 40]
    assert torch.load(kept[20], weights_only=True)["step"] == 20  # each file is its own step's, not the latest
    for step in (50, 60, 70):  # a spike event at step 45: the two checkpoints before it stay
        atomic_torch_save({"step": step}, ck)
        archive_checkpoint(ck, step, keep=2, protect=[45])
    assert sorted(checkpoint_history(tmp_path)) == [30, 40, 60, 70]


def test_poison_batch_is_uniform_random_and_keeps_ignored_targets():
    x = torch.zeros(64, 32, dtype=torch.long)
    y = torch.zeros(64, 32, dtype=torch.long)
    y[:, 0] = -1
    px, py = poison_batch(x, y, seed=0, step=5, vocab_size=256)
    assert (py[:, 0] == -1).all() and (py[:, 1:] >= 0).all()
    counts = torch.bincount(px.flatten(), minlength=256).float()  # 2048 draws: ~8 +- 2.8 per value if uniform
    assert (counts > 0).sum() > 240 and counts.max() < 25
    assert torch.equal(poison_batch(x, y, 0, 5, 256)[0], px)


def _rec(name, losses, start=10, status="completed"):
    return dict(name=name, steps=list(range(start, start + len(losses))), losses=list(losses), status=status, history={}, events=[],
                error="")


def test_verdict_on_synthetic_replays():
    base = [2.0] * 6
    spike = base[:4] + [6.0, 2.5]  # the peak at step 14: height log(6 / 2) over the baseline 2.0
    kinds = {"same data": "control", "other data": "data", "reordered data": "data", "lr x0.5": "lr", "clip 1.0": "mitigation"}
    data = [_rec("same data", spike), _rec("other data", base), _rec("reordered data", [6.0] + base[1:]),
            _rec("lr x0.5", spike), _rec("clip 1.0", [2.0, 2.0, 2.0, 2.0, 2.5, 2.0])]
    v = analyse(data, kinds, start=10, spike=14, stop=16, recorded={10 + i: x for i, x in enumerate(spike)})
    assert v.cause == "data" and v.reproduced.startswith("bitwise")
    assert v.row("other data").effect == "removes" and v.row("reordered data").effect == "no effect"
    assert v.row("clip 1.0").effect == "removes"  # log(2.5 / 2) = 0.22 < 0.35 * log 3 = 0.38
    assert v.fixes == ["clip 1.0"]
    assert v.row("same data").steps_to_recover == 1  # 2.5 <= 2.0 * 3 ** 0.25 = 2.63
    assert v.row("other data").height == pytest.approx(0.0) and v.reference_height == pytest.approx(math.log(3))
    assert "batches 10..14" in v.sentence and "clip 1.0 removes it" in v.sentence and "a lower LR does not help" in v.sentence

    long = spike + [2.0] * 4
    state = [_rec("same data", long), _rec("other data", [2.0, 2.0, 2.0, 2.0, 5.8, 2.4] + [2.0] * 4),
             _rec("lr x0.5", [2.0] * 8 + [5.0, 2.0])]  # its peak 4 steps after the spike's
    recorded = {10 + i: x for i, x in enumerate(long)} | {15: 2.5000001}
    v = analyse(state, kinds, start=10, spike=14, stop=20, recorded=recorded)
    assert v.cause == "state" and v.reproduced.startswith("not bitwise") and "hardware" in v.sentence
    assert v.row("lr x0.5").effect == "delays" and "a lower LR (lr x0.5) delays it" in v.sentence

    diverged = [_rec("same data", base[:4] + [math.nan], status="diverged"), _rec("other data", base)]
    v = analyse(diverged, kinds, start=10, spike=14, stop=16)
    assert v.row("same data").peak_loss == math.inf and v.cause == "data"

    quiet = [_rec("same data", base), _rec("other data", base)]
    assert analyse(quiet, kinds, start=10, spike=14, stop=16, recorded={14: 6.0}).cause == "not reproduced"
    assert analyse(quiet, kinds, start=10, spike=14, stop=16).cause == "no spike"


# --- any loop: a linear regression with a poisoned batch ------------------------------------------

POISON_STEP = 25


def _regression_batch(i: int):
    g = torch.Generator().manual_seed(i)
    x = torch.randn(32, 8, generator=g)
    y = x @ torch.arange(1.0, 9.0)[:, None]
    return x, (y * 30 if i == POISON_STEP else y)  # a batch of wrong labels


def _regression_build():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    return model, torch.optim.Adam(model.parameters(), lr=0.05)


def _regression_loss(model, batch, step):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def _regression_run(steps: int = 40):
    model, opt = _regression_build()
    losses, cks = [], []
    for i in range(steps):
        if i % 5 == 0:
            cks.append(dict(model={k: v.clone() for k, v in model.state_dict().items()}, optim=_clone(opt.state_dict()), step=i,
                            rng=torch.get_rng_state()))
        loss = _regression_loss(model, _regression_batch(i), i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, cks


def _clone(state):
    import copy

    return copy.deepcopy(state)


def test_any_loop_poisoned_batch_is_data_caused():
    losses, cks = _regression_run()
    before = _clone(cks[3])
    assert losses[POISON_STEP] > 10 * max(losses[15:POISON_STEP])  # the injected spike is there
    r = autopsy(make_batch=_regression_batch, build=_regression_build, loss_fn=_regression_loss, checkpoint=cks, step=POISON_STEP,
                window=6, after=8, losses=losses, monitor="minimal")
    assert r.checkpoint_step == 15  # the newest checkpoint at least 6 steps before 25
    assert r.verdict.reproduced.startswith("bitwise")
    assert r.cause == "data", r.table()
    assert r.verdict.row("other data").effect == "removes"
    assert r.verdict.row("skip spike batches").effect == "removes"
    assert r.verdict.row("reordered data").peak_step == 15  # the poisoned batch moved to the window's first step, and spiked there
    assert "grad/norm" in " ".join(r.verdict.row("same data").moved)
    after = cks[3]  # the replays never update the checkpoint's tensors in place (the next replay starts from it)
    assert all(torch.equal(a, b) for a, b in zip(before["optim"]["state"][0].values(), after["optim"]["state"][0].values()))


@pytest.mark.slow  # two spawned workers import torch and seismo: ~5 s alone, ~25 s on a loaded machine
def test_any_loop_replays_in_worker_processes_give_the_same_table():
    losses, cks = _regression_run()
    kw = dict(make_batch=_regression_batch, build=_regression_build, loss_fn=_regression_loss, checkpoint=cks, step=POISON_STEP,
              window=6, after=4, losses=losses, monitor="none",
              replays=[ReplaySpec("same data"), ReplaySpec("other data", "data", data="other"), ReplaySpec("lr x0.5", "lr", lr_scale=0.5)])
    serial = autopsy(**kw, workers=1)
    parallel = autopsy(**kw, workers=2)
    assert [r.to_dict() for r in parallel.rows] == [r.to_dict() for r in serial.rows]
    assert parallel.cause == "data+state" or parallel.cause == "data"


# --- the proxy lab: injected spikes of known cause --------------------------------------------------


def _core_replays():
    return [ReplaySpec("same data"), ReplaySpec("other data", "data", data="other"), ReplaySpec("reordered data", "data", data="reorder"),
            ReplaySpec("lr x0.5", "lr", lr_scale=0.5), ReplaySpec("lr x0.25", "lr", lr_scale=0.25)]


def _proxy_run(tmp_path, name: str, steps: int = 44, **overrides):
    cfg = get_preset("tiny")
    cfg.steps, cfg.checkpoint_every, cfg.checkpoint_keep, cfg.eval_every = steps, 8, 0, 0
    cfg.monitor = "minimal"
    cfg.out_dir, cfg.store, cfg.run_name = str(tmp_path / name), str(tmp_path / "seismo.sqlite"), name
    for key, value in overrides.items():
        obj = cfg
        *path, last = key.split("__")
        for p in path:
            obj = getattr(obj, p)
        setattr(obj, last, value)
    return cfg, train(cfg)


def test_proxy_poisoned_batch_other_data_removes_it_same_data_reproduces_it(tmp_path):
    cfg, r = _proxy_run(tmp_path, "poison", spikes__poison_steps=[32])
    assert r.train_loss[32] > np.max(r.train_loss[24:32]) + 1.0
    res = autopsy_run(cfg.store, "poison", 32, window=6, after=6, workers=1)
    assert res.checkpoint_step == 24
    v = res.verdict
    assert v.row("same data").bitwise is True and v.row("same data").peak_step == 32
    assert res.cause == "data", res.table()
    assert v.row("other data").effect == "removes" and v.row("skip spike batches").effect == "removes"
    assert v.row("lr x0.25").effect not in ("removes",)  # the batch's own loss is high whatever the step size
    with RunStore(cfg.store) as st:
        names = {x.name for x in st.runs()}
        summary = st.find_run(res.summary_run_id)
    assert {"poison/autopsy@32/same data", "poison/autopsy@32/other data"} <= names
    assert summary.meta["autopsy"]["cause"] == "data"


def test_proxy_lr_burst_lower_lr_removes_it_other_data_does_not(tmp_path):
    # lr 1e-3 x50 at steps 30 and 31: the loss after them jumps by ~3 nats whatever the batches
    cfg, r = _proxy_run(tmp_path, "burst", optim__lr=1e-3, spikes__lr_burst_steps=[30, 31])
    assert r.train_loss[31] > np.max(r.train_loss[24:30]) + 1.0
    res = autopsy_run(cfg.store, "burst", 31, window=6, after=6, workers=1, replays=_core_replays())
    assert res.cause == "state", res.table()
    assert res.verdict.row("other data").effect in ("no effect", "worse")
    assert res.verdict.row("lr x0.25").effect == "removes"
    assert "a lower LR (" in res.sentence and "removes it" in res.sentence


def test_proxy_state_blow_up_other_data_does_not_remove_it(tmp_path):
    # beta2 0.3 with eps 1e-12: Adam's v follows the last one or two gradients, m the last ten, and
    # updates m / sqrt(v) blow up whatever the data (Kingma & Ba's beta1 < sqrt(beta2) is violated)
    cfg, r = _proxy_run(tmp_path, "state", optim__lr=1e-2, optim__beta2=0.3, optim__eps=1e-12)
    spike = 26 + int(np.argmax(r.train_loss[26:38]))
    assert r.train_loss[spike] > 10 * np.median(r.train_loss[16:24])  # a blow-up, not noise
    res = autopsy_run(cfg.store, "state", spike, window=6, after=6, workers=1, replays=_core_replays())
    assert res.cause == "state", res.table()
    assert res.verdict.row("other data").effect in ("no effect", "worse", "delays")


def test_cli_autopsy_prints_the_table_and_verdict(tmp_path, capsys):
    cfg, _ = _proxy_run(tmp_path, "cli", steps=30, spikes__poison_steps=[20])
    assert main(["autopsy", "cli", "--step", "20", "--window", "4", "--after", "2", "--store", cfg.store, "--workers", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cause"] == "data" and out["start"] == 16
    assert main(["autopsy", "cli", "--step", "3", "--window", "4", "--store", cfg.store]) == 2
    assert "no checkpoint at least 4 steps before step 3" in capsys.readouterr().err
    assert main(["autopsy", "cli", "--step", "20", "--window", "0", "--store", cfg.store]) == 2


def test_replays_use_the_recorded_thread_count(tmp_path):
    cfg, r = _proxy_run(tmp_path, "threads", steps=16)
    assert r.meta["torch_threads"] == torch.get_num_threads() >= 1
    assert os.path.isdir(os.path.join(cfg.out_dir, "checkpoints"))


def test_checkpoints_written_before_the_injection_fields_still_resume():
    from seismo.proxy.checkpoint import config_differences
    from seismo.proxy.train import TrainConfig

    now = TrainConfig().to_dict()
    old = {k: v for k, v in now.items() if k != "checkpoint_keep"}
    old["spikes"] = {k: v for k, v in now["spikes"].items() if k in ("steps", "factor")}
    assert config_differences(old, now, ignore=frozenset({"checkpoint_keep"})) == []
    old["spikes"]["factor"] = 10.0
    assert [d[0] for d in config_differences(old, now)] == ["spikes.factor"]  # checkpoint_keep may change at resume
