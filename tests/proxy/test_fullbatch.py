"""Full-batch MLP runs (seismo.proxy.fullbatch): the loop against a hand-written reference, the
two seed claims at a small scale (perpendicular gradients generalise on modular addition where
plain softmax training does not; full-batch GD hovers at the edge of stability), the per-trial
measures, the sweep presets that use them, and clear config errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seismo.proxy.config import apply_overrides
from seismo.proxy.fullbatch import FullBatchConfig, build_mlp, modular_tensors, train_fullbatch
from seismo.proxy.measures import first_step_at_or_above, sharpness_ratio, trial_measures
from seismo.proxy.model import ConfigError
from seismo.proxy.presets import get_preset
from seismo.proxy.sweep import expand, run_trial
from seismo.proxy.sweep_presets import get_sweep_preset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_modular(**kw) -> FullBatchConfig:
    cfg = get_preset("modular_mlp")
    cfg.hidden, cfg.steps, cfg.eval_every, cfg.log_every = [64, 64], 150, 25, 25
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_modular_run_matches_a_hand_written_loop_bitwise():
    cfg = small_modular(steps=20, monitor="default")
    r = train_fullbatch(cfg)
    # reference: Prieto et al.'s setup written out by hand
    data = modular_tensors(cfg)
    X, Y = data["train"]
    assert X.shape == (round(0.4 * 113 * 113), 226) and torch.equal(X.sum(1), torch.full((len(X),), 2.0))
    torch.manual_seed(cfg.seed)
    model = torch.nn.Sequential(torch.nn.Linear(226, 64, bias=False), torch.nn.ReLU(), torch.nn.Linear(64, 64, bias=False),
                                torch.nn.ReLU(), torch.nn.Linear(64, 113, bias=False))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-25, weight_decay=0.0)
    ref = []
    for _ in range(20):
        loss = F.cross_entropy(model(X), Y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref.append(float(loss.detach()))
    assert r.train_loss.tolist() == ref  # the monitor observes without perturbing
    assert r.status == "completed" and r.meta["data"]["n_train"] == len(X)


def test_perpendicular_gradients_generalise_where_softmax_training_memorises():
    """Prieto et al. 2025: without weight decay, the perp-Grad run reaches high test accuracy within
    a few hundred full-batch steps while the plain softmax run only memorises the training split."""
    plain = trial_measures(train_fullbatch(small_modular()).history)
    perp = trial_measures(train_fullbatch(small_modular(perp_grad=True)).history)
    assert plain["final_train_acc"] > 0.95 and plain["final_val_acc"] < 0.05
    assert perp["final_val_acc"] > 0.3 > plain["final_val_acc"] + 0.25


def test_stablemax_uses_the_float64_stablemax_loss():
    from seismo.mitigate.losses import stablemax_cross_entropy

    cfg = small_modular(output="stablemax", steps=1, monitor="none")
    r = train_fullbatch(cfg)
    X, Y = modular_tensors(cfg)["train"]
    torch.manual_seed(cfg.seed)
    model = build_mlp(cfg, 226, 113)
    with torch.no_grad():
        assert r.train_loss[0] == float(stablemax_cross_entropy(model(X), Y))


def test_gradient_descent_hovers_at_the_edge_of_stability():
    """Cohen et al. 2021: with full-batch GD the top Hessian eigenvalue rises to 2/lr and stays there."""
    cfg = get_preset("eos_mlp")
    apply_overrides(cfg, ["steps=300", "lr=0.2", "eval_every=100"])
    r = train_fullbatch(cfg)
    s, eig = r.history["hessian/max_eig"]
    _, thr = r.history["hessian/threshold"]
    assert np.allclose(thr, 2 / 0.2)
    assert eig[0] < 0.6 * 10  # starts well below 2/lr ...
    m = trial_measures(r.history)
    assert 0.8 < m["sharpness_ratio"] < 1.25  # ... and ends hovering around it
    assert m["max_sharpness_ratio"] > 1.0
    assert any(e.kind == "edge_of_stability" for e in r.events)


def test_trial_measures_hand_computed():
    hist = {
        "val/acc": (np.array([10, 20, 30, 40]), np.array([0.1, 0.96, 0.9, 0.97])),
        "train/acc": (np.array([10, 20, 30, 40]), np.array([0.5, 1.0, 1.0, 1.0])),
        "logits/softmax_collapse": (np.array([0, 1, 2]), np.array([0.0, np.nan, 0.25])),
        "hessian/max_eig": (np.array([0, 10, 20, 30]), np.array([1.0, 4.0, 9.0, 11.0])),
        "hessian/threshold": (np.array([0, 10, 20, 30]), np.array([10.0, 10.0, 10.0, 10.0])),
    }
    m = trial_measures(hist)
    assert m["final_val_acc"] == 0.97 and m["grok_step"] == 20 and m["final_train_acc"] == 1.0
    assert m["max_softmax_collapse"] == 0.25
    assert m["sharpness_ratio"] == pytest.approx(1.0)  # median of [0.9, 1.1]
    assert m["max_sharpness_ratio"] == pytest.approx(1.1)
    assert trial_measures({}) == {}
    assert first_step_at_or_above([1, 2], [0.5, np.nan], 0.9) is None
    assert all(math.isnan(x) for x in sharpness_ratio([np.nan], [1.0]))


@pytest.mark.parametrize("name", ["spam", "grokking", "edge_of_stability"])
def test_new_sweep_presets_expand(name):
    for quick in (True, False):
        trials = expand(get_sweep_preset(name, quick))
        assert len({t.key for t in trials}) == len(trials)
    if name == "spam":
        by_iv = {t.intervention: t.config for t in expand(get_sweep_preset(name, False))}
        assert by_iv["adamw_clean"]["spikes"]["steps"] == []
        for iv in ("adamw", "spam", "stable_spam", "guard_skip"):
            spikes = by_iv[iv]["spikes"]
            assert (spikes["steps"], spikes["factor"]) == ([75, 76, 150, 225], 1000.0)
            assert not spikes.get("poison_steps") and not spikes.get("lr_burst_steps")  # only gradient spikes
            assert by_iv[iv]["optim"]["beta2"] == 0.999
        assert by_iv["spam"]["optim"]["name"] == "spam" and by_iv["guard_skip"]["guard"] == "skip"
    else:
        assert all(t.config["kind"] == "fullbatch" and t.config["lr"] == t.lr for t in trials)


def test_run_trial_dispatches_full_batch_configs():
    t = expand(get_sweep_preset("edge_of_stability", True))[0]
    cfg = dict(t.config, steps=40, curvature_every=10)
    rec = run_trial(cfg)
    assert rec["status"] == "completed" and rec["steps_done"] == 40
    assert math.isfinite(rec["sharpness_ratio"]) and math.isnan(rec["max_attn_logit"])
    assert rec["init_loss"] > rec["final_train_loss"] > 0


@pytest.mark.parametrize("override, match", [
    ("task=vision", "task"), ("output=stablemax", "stablemax needs a classification"), ("hidden=[]", "hidden"),
    ("optimizer=lion", "optimizer"), ("lr=-1", "lr"), ("dtype=float16", "dtype"), ("beta2=1.0", "beta2"),
    ("steps=0", "steps"), ("curvature_every=-1", "curvature_every"),
])
def test_config_errors_name_the_field(override, match):
    cfg = get_preset("eos_mlp")
    apply_overrides(cfg, [override])
    with pytest.raises(ConfigError, match=match):
        train_fullbatch(cfg)
    with pytest.raises(ConfigError, match="unknown key"):
        apply_overrides(get_preset("eos_mlp"), ["nope=1"])
