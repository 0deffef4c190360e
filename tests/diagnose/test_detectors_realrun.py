"""Every detector on a real (small, fast) training run: it fires where the instability is and not
on the stabilised twin.

Each test trains something for a few seconds on one CPU thread with the Monitor and the default
detectors running live (``Monitor(..., diagnose=Diagnoser())``), then checks the events: kind,
severity, step and, where it matters, the module named. Slower tests are marked ``slow``.
"""

from __future__ import annotations

import warnings
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from seismo import Monitor
from seismo.diagnose import Diagnoser, Event
from seismo.monitor import build_probes, every
from seismo.monitor.curvature_probe import CurvatureProbe
from seismo.proxy import train
from seismo.proxy.data import DataConfig, ModularDataset, load_dataset
from seismo.proxy.model import GPTConfig, TinyGPT
from seismo.proxy.presets import get_preset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _kind(events: list[Event], kind: str, severity: str | None = None) -> list[Event]:
    return [e for e in events if e.kind == kind and (severity is None or e.severity == severity)]


def _monitored(model: nn.Module, opt: torch.optim.Optimizer, probes="full") -> tuple[Monitor, Diagnoser]:
    diag = Diagnoser()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # probes that do not apply to an MLP (attention, blocks) turn off
        mon = Monitor(model, opt, probes=probes, flush_every=10, diagnose=diag, alerts=False)
    return mon, diag


# --- TinyGPT helpers ----------------------------------------------------------------------------

_DATA = {}


def _tiny_data():
    if "ds" not in _DATA:
        _DATA["ds"] = load_dataset(DataConfig(max_bytes=100_000))
    return _DATA["ds"]


def _tiny_loop(steps: int, *, lr: float = 1e-2, eps: float = 1e-8,
               before_step: Callable[[int, nn.Module, torch.optim.Optimizer], None] | None = None,
               grad_scale: Callable[[int], float] | None = None, grad_param: str = "", probes="full", seed: int = 0) -> list[Event]:
    """A 2-layer d=64 TinyGPT on 8 x 64 tokens per step, AdamW at a constant ``lr``."""
    ds = _tiny_data()
    torch.manual_seed(seed)
    model = TinyGPT(GPTConfig(vocab_size=ds.vocab_size, block_size=64, n_embd=64))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, eps=eps, weight_decay=0.0)
    state = {"step": 0}
    if grad_scale is not None:
        dict(model.named_parameters())[grad_param].register_hook(lambda g: g * grad_scale(state["step"]))
    mon, diag = _monitored(model, opt, probes)
    for step in range(steps):
        state["step"] = step
        if before_step is not None:
            before_step(step, model, opt)
        x, y = ds.batch("train", 0, step, 8, 64)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mon.step(loss)
    mon.close()
    return diag.events


def _proxy_tiny(lr: float, qk_norm: bool, steps: int = 60) -> list[Event]:
    cfg = get_preset("tiny")
    cfg.steps, cfg.eval_every, cfg.log_every = steps, 0, 10
    cfg.optim.lr = lr
    cfg.model.n_layer = 1
    cfg.model.qk_norm = qk_norm
    cfg.data.max_bytes = 100_000
    return train(cfg, on_event=lambda evs: None).events


# --- attention_logit_growth (GrowthDetector) and attention_entropy_collapse ----------------------

def test_attention_logit_growth_warns_before_the_blow_up_and_not_with_qk_norm():
    events = _proxy_tiny(lr=0.1, qk_norm=False)
    warn = _kind(events, "attention_logit_growth", "warning")
    crit = _kind(events, "attention_logit_growth", "critical")
    assert warn and crit, [(e.step, e.kind, e.severity) for e in events]
    assert warn[0].module == crit[0].module == "transformer.h.0.attn"
    assert warn[0].step < crit[0].step
    assert warn[0].evidence["predicted_step"] >= warn[0].step
    assert _kind(events, "attention_entropy_collapse")  # one-hot attention comes with the logit blow-up

    stable = _proxy_tiny(lr=0.1, qk_norm=True)
    assert not _kind(stable, "attention_logit_growth")
    assert not _kind(stable, "attention_entropy_collapse")


# --- nonfinite (NonFiniteDetector) ----------------------------------------------------------------

def test_nonfinite_fires_once_when_a_weight_turns_nan():
    def poison(step, model, opt):
        if step == 20:
            with torch.no_grad():
                model.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")

    events = _tiny_loop(30, before_step=poison, probes="minimal")
    nf = _kind(events, "nonfinite")
    assert len(nf) == 1, [(e.step, e.kind) for e in events]
    assert nf[0].step == 20 and nf[0].severity == "critical"
    assert nf[0].evidence["modules"], "the modules with non-finite gradients are listed"
    clean = _tiny_loop(30, probes="minimal")
    assert not _kind(clean, "nonfinite")


# --- loss_spike and grad_spike (SpikeDetector) ----------------------------------------------------

def test_loss_spike_on_a_one_step_lr_burst():
    burst_at = 60

    def lr_burst(step, model, opt):
        for g in opt.param_groups:
            g["lr"] = 1e-2 * (30.0 if step == burst_at else 1.0)

    events = _tiny_loop(80, before_step=lr_burst, probes="minimal")
    spikes = _kind(events, "loss_spike")
    assert spikes, [(e.step, e.kind) for e in events]
    assert burst_at + 1 <= spikes[0].step <= burst_at + 3  # the loss after the oversized update jumps
    assert spikes[0].evidence["ratio"] > 1.1
    assert not _kind(_tiny_loop(80, probes="minimal"), "loss_spike")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grad_spike_names_the_module_whose_gradient_jumped(seed):
    """A x100 gradient injected into one weight at step 50 is a grad_spike at step 50 naming its module,
    on every seed and any CPU kernel (the module's own norm against its own history decides, so it does
    not depend on how much the global norm happened to move, nor on an unrelated early spike)."""
    events = _tiny_loop(70, grad_scale=lambda s: 100.0 if s == 50 else 1.0,
                        grad_param="transformer.h.1.mlp.c_fc.weight", probes="minimal", seed=seed)
    at = [e for e in _kind(events, "grad_spike") if e.step == 50]
    assert at, [(e.step, e.kind, e.module) for e in events]
    assert at[0].module == "transformer.h.1.mlp.c_fc"
    assert at[0].evidence["ratio"] > 2
    # the same run without the injection: nothing blames that module there
    clean = _kind(_tiny_loop(70, probes="minimal", seed=seed), "grad_spike")
    assert not [e for e in clean if 45 <= e.step <= 55 and e.module == "transformer.h.1.mlp.c_fc"]


# --- epsilon_regime (ThresholdDetector) and stall (StallDetector) -----------------------------------

def test_epsilon_regime_with_a_huge_adam_eps():
    events = _tiny_loop(20, eps=1.0)
    eps_events = _kind(events, "epsilon_regime")
    assert eps_events, [(e.step, e.kind) for e in events]
    assert eps_events[0].step <= 5  # three consecutive observations
    assert all(not any(x in e.module for x in ("wte", "wpe")) for e in eps_events)
    assert not _kind(_tiny_loop(20), "epsilon_regime")


def _mlp_task(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 32, generator=g)
    y = (x[:, :8].sum(1) > 0).long() + 2 * (x[:, 8:16].sum(1) > 0).long()
    return x, y, g


def _mlp_run(steps: int, make_opt, batch: int = 0) -> list[Event]:
    x, y, g = _mlp_task()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = make_opt(model.parameters())
    mon, diag = _monitored(model, opt)
    for _ in range(steps):
        if batch:
            ix = torch.randint(0, len(x), (batch,), generator=g)
            xb, yb = x[ix], y[ix]
        else:
            xb, yb = x, y
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mon.step(loss)
    mon.close()
    return diag.events


def test_stall_when_adam_eps_swallows_the_updates():
    events = _mlp_run(220, lambda p: torch.optim.Adam(p, lr=1e-3, eps=1e3))
    stall = _kind(events, "stall")
    assert len(stall) == 1 and stall[0].evidence["update_ratio"] < 1e-5
    assert _kind(events, "epsilon_regime")  # the cause, named first
    assert not _kind(_mlp_run(220, lambda p: torch.optim.Adam(p, lr=1e-3)), "stall")


# --- adam_decorrelation (AdamDecorrelationDetector) -------------------------------------------------

def test_adam_decorrelation_on_time_correlated_full_batch_gradients():
    # Full batch and a tiny lr: the gradient barely changes between steps, so m_hat / sqrt(v_hat)
    # sits at +-1 for almost every coordinate (Molybog et al. 2023). Mini-batches decorrelate it.
    events = _mlp_run(120, lambda p: torch.optim.Adam(p, lr=1e-5))
    dec = _kind(events, "adam_decorrelation")
    assert dec and dec[0].step >= 100 and dec[0].evidence["value"] > 0.9
    assert not _kind(_mlp_run(120, lambda p: torch.optim.Adam(p, lr=1e-5), batch=16), "adam_decorrelation")


# --- softmax_collapse (ThresholdDetector) ----------------------------------------------------------

class _Scaled(nn.Module):
    """An MLP whose logits can be multiplied by a factor: a fast way into float32 softmax collapse."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(226, 64, bias=False), nn.ReLU(), nn.Linear(64, 113, bias=False))
        self.scale = 1.0

    def forward(self, x):
        return self.net(x) * self.scale


def _modular_run(steps: int, scale_from: int | None) -> list[Event]:
    ds = ModularDataset(113, "add", 0.4, 0)
    a, y = ds.x["train"], ds.y["train"][:, -1]
    x = torch.cat([F.one_hot(a[:, 0], 113), F.one_hot(a[:, 1], 113)], 1).float()
    torch.manual_seed(0)
    model = _Scaled()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    mon, diag = _monitored(model, opt, probes="default")
    for step in range(steps):
        if scale_from is not None and step >= scale_from:
            model.scale = 1e4
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mon.step(loss)
    mon.close()
    return diag.events


def test_softmax_collapse_on_modular_arithmetic_with_scaled_logits():
    events = _modular_run(20, scale_from=10)
    sc = _kind(events, "softmax_collapse")
    assert sc, [(e.step, e.kind) for e in events]
    assert sc[0].step == 10 and sc[-1].severity == "critical"
    assert not _kind(_modular_run(20, scale_from=None), "softmax_collapse")


# --- edge_of_stability (EdgeOfStabilityDetector) --------------------------------------------------

def _gd_mlp(lr: float, steps: int) -> list[Event]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g)
    y = torch.sin(x @ torch.randn(16, 1, generator=g)) + 0.5 * torch.cos(2 * x[:, :1])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = lambda m: F.mse_loss(m(x), y)  # noqa: E731
    probes = build_probes("minimal") + [CurvatureProbe(loss_fn, schedule=every(10), iters=20)]
    mon, diag = _monitored(model, opt, probes)
    for _ in range(steps):
        loss = loss_fn(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mon.step(loss)
    mon.close()
    return diag.events


@pytest.mark.slow
def test_edge_of_stability_warns_before_sharpness_reaches_2_over_lr():
    # Full-batch GD, lr 0.1: progressive sharpening lifts lambda_max from ~4 to 2/lr = 20 (Cohen et al. 2021).
    events = _gd_mlp(0.1, 600)
    eos = _kind(events, "edge_of_stability")
    warn, crit = _kind(eos, "edge_of_stability", "warning"), _kind(eos, "edge_of_stability", "critical")
    assert warn and crit, [(e.step, e.kind, e.severity) for e in events]
    assert warn[0].step < crit[0].step
    assert crit[0].evidence["sharpness"] >= crit[0].evidence["threshold"] == pytest.approx(20.0)
    assert not _kind(_gd_mlp(0.01, 600), "edge_of_stability")  # 2/lr = 200: far away
