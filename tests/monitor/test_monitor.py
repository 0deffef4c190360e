"""Oracle tests for the Monitor: every signal against a slow reference computed in the test.

Models: TinyGPT with a tiny config (2 layers, d=16, T=16) and small MLPs. References are plain
torch computations on copies taken in the test (gradients before clipping, parameters before and
after the step, the optimizer's state, c_attn outputs, block outputs, dense Hessians), plus the
checkable numbers of METHODS.md (Adam update ratio, softmax collapse thresholds).
"""

from __future__ import annotations

import copy
import math
import re
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

from seismo.errors import ConfigError
from seismo.monitor import AdamProbe, GradientProbe, LogitsProbe, LossProbe, Monitor, UpdateProbe, build_probes, every
from seismo.monitor.attention import attention_stats
from seismo.monitor.curvature import hutchinson_trace
from seismo.monitor.curvature_probe import CurvatureProbe
from seismo.monitor.logits import logit_stats
from seismo.monitor.probe import HookSet, ProbeContext
from seismo.proxy.loop import gpt_loss, train_step
from seismo.proxy.model import GPTConfig, TinyGPT
from seismo.report import load_run

V, T = 32, 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def tiny_cfg(**kw) -> GPTConfig:
    return GPTConfig(vocab_size=V, block_size=T, n_layer=2, n_head=2, n_embd=16, **kw)


def tiny_gpt(seed: int = 0, **kw) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(tiny_cfg(**kw))


def tokens(seed: int, b: int = 4, t: int = T) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(0, V, (b, t), generator=g), torch.randint(0, V, (b, t), generator=g)


class MLP(nn.Module):
    def __init__(self, d_in: int = 6, d_hidden: int = 8, d_out: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def by_module(named) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """Group ``(param_name, tensor)`` pairs by owning module (the name minus its last part)."""
    out: dict[str, list] = {}
    for name, t in named:
        out.setdefault(name.rsplit(".", 1)[0], []).append((name, t))
    return out


def norm64(tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def last(mon: Monitor, name: str) -> float:
    return mon.series(name)[1][-1]


def at(mon: Monitor, name: str, step: int) -> float:
    steps, vals = mon.series(name)
    return vals[steps.index(step)]


def lm_step(model, opt, x, y, mon=None, clip=None):
    return train_step(model, opt, gpt_loss, (x, y), monitor=mon, clip=clip)


# --------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------


def test_grad_norms_are_read_before_clipping():
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mon = Monitor(model, opt, probes="minimal", flush_every=1)
    for step in range(3):
        x, y = tokens(step)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [(n, p.grad.detach().clone()) for n, p in model.named_parameters()]
        pre = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)
        post = norm64(p.grad for p in model.parameters())
        opt.step()
        mon.step(loss)

        manual = norm64(g for _, g in grads)
        assert post == pytest.approx(1e-3, rel=1e-4)  # clipping was active ...
        assert at(mon, "grad/norm", step) == pytest.approx(manual, rel=1e-5)  # ... and grad/norm is pre-clip
        assert at(mon, "grad/norm", step) == pytest.approx(float(pre), rel=1e-5)
        assert manual > 100 * post
        assert at(mon, "grad/nonfinite", step) == 0
        for mod, items in by_module(grads).items():
            sq = sum(float(g.double().pow(2).sum()) for _, g in items)
            numel = sum(g.numel() for _, g in items)
            assert at(mon, f"grad/norm/{mod}", step) == pytest.approx(math.sqrt(sq), rel=1e-5), mod
            assert at(mon, f"grad/rms/{mod}", step) == pytest.approx(math.sqrt(sq / numel), rel=1e-5), mod
    mon.close()


def test_grad_nonfinite_counts_injected_values():
    torch.manual_seed(0)
    model = MLP()

    def poison(g):
        g = g.clone()
        g[0, 0], g[1, 1], g[2, 2] = math.inf, -math.inf, math.nan
        return g

    handle = model.fc1.weight.register_hook(poison)
    mon = Monitor(model, probes="minimal", flush_every=1)
    x = torch.randn(5, 6)
    loss = model(x).pow(2).mean()
    loss.backward()
    mon.step(loss)
    handle.remove()
    assert last(mon, "grad/nonfinite") == 3
    assert math.isnan(last(mon, "grad/norm"))
    assert math.isnan(last(mon, "grad/norm/fc1"))
    fc2 = [(n, p.grad) for n, p in model.named_parameters() if n.startswith("fc2")]
    assert last(mon, "grad/norm/fc2") == pytest.approx(norm64(g for _, g in fc2), rel=1e-5)
    # the next step is clean again
    model.zero_grad()
    loss = model(x).pow(2).mean()
    loss.backward()
    mon.step(loss)
    assert last(mon, "grad/nonfinite") == 0
    assert last(mon, "grad/norm") == pytest.approx(norm64(p.grad for p in model.parameters()), rel=1e-5)
    mon.close()


def test_grad_norm_with_gradient_accumulation_is_the_accumulated_gradient():
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mon = Monitor(model, opt, probes="minimal", flush_every=1)
    x, y = tokens(0, b=4)
    opt.zero_grad(set_to_none=True)
    first = None
    for micro in range(2):
        _, loss = model(x[2 * micro : 2 * micro + 2], y[2 * micro : 2 * micro + 2])
        (loss / 2).backward()
        if first is None:
            first = norm64(p.grad for p in model.parameters())
    accumulated = norm64(p.grad for p in model.parameters())
    opt.step()
    mon.step(loss)
    assert last(mon, "grad/norm") == pytest.approx(accumulated, rel=1e-5)
    assert abs(accumulated - first) > 1e-3 * accumulated  # the first micro-batch alone differs

    # equal halves with mean losses: the accumulated gradient is the full-batch gradient
    ref = copy.deepcopy(model)
    ref.zero_grad()
    ref(x, y)[1].backward()
    model.zero_grad()
    for micro in range(2):
        (model(x[2 * micro : 2 * micro + 2], y[2 * micro : 2 * micro + 2])[1] / 2).backward()
    assert norm64(p.grad for p in model.parameters()) == pytest.approx(norm64(p.grad for p in ref.parameters()), rel=1e-4)
    mon.close()


# --------------------------------------------------------------------------
# parameters and updates
# --------------------------------------------------------------------------


def test_param_norms_and_update_sizes_vs_copies():
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    mon = Monitor(model, opt, probes=[UpdateProbe(schedule=every(1))], flush_every=1)
    for step in range(3):
        x, y = tokens(step)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        after = {n: p.detach().clone() for n, p in model.named_parameters()}
        mon.step(loss)
        diff = [(n, after[n] - before[n]) for n in after]
        assert at(mon, "update/norm", step) == pytest.approx(norm64(d for _, d in diff), rel=1e-4)
        assert at(mon, "param/norm", step) == pytest.approx(norm64(after.values()), rel=1e-5)
        for mod, items in by_module(after.items()).items():
            pn = norm64(t for _, t in items)
            un = norm64(after[n] - before[n] for n, _ in items)
            assert at(mon, f"param/norm/{mod}", step) == pytest.approx(pn, rel=1e-5), mod
            assert at(mon, f"update/ratio/{mod}", step) == pytest.approx(un / pn, rel=1e-4), mod
    mon.close()


# --------------------------------------------------------------------------
# Adam state
# --------------------------------------------------------------------------


def test_adam_signals_vs_optimizer_state():
    model = tiny_gpt()
    # a large eps makes part of the coordinates eps-dominated, so that signal is not trivially 0
    b1, b2, eps = 0.9, 0.95, 1e-3
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(b1, b2), eps=eps, weight_decay=0.1)
    mon = Monitor(model, opt, probes=[AdamProbe(schedule=every(1))], flush_every=1)
    names = {id(p): n for n, p in model.named_parameters()}
    saw_eps_dominated = False
    for step in range(3):
        x, y = tokens(step)
        lm_step(model, opt, x, y, mon)
        rs, grads, vs, per_mod = [], [], [], {}
        for p, st_ in opt.state.items():
            t = float(st_["step"])
            m_hat = st_["exp_avg"].double() / (1 - b1**t)
            v_hat = st_["exp_avg_sq"].double() / (1 - b2**t)
            r = (m_hat / (v_hat.sqrt() + eps)).reshape(-1)
            rs.append(r)
            grads.append(p.grad.double().reshape(-1))
            vs.append(st_["exp_avg_sq"].double().reshape(-1))
            mod = names[id(p)].rsplit(".", 1)[0]
            per_mod.setdefault(mod, ([], []))
            per_mod[mod][0].append(r)
            per_mod[mod][1].append(v_hat.sqrt().reshape(-1))
        r_all, g_all, v_all = torch.cat(rs), torch.cat(grads), torch.cat(vs)
        cos = float(r_all @ g_all / (r_all.norm() * g_all.norm()))
        assert at(mon, "adam/update_grad_cos", step) == pytest.approx(cos, rel=1e-4)
        assert at(mon, "adam/v_l1", step) == pytest.approx(float(v_all.abs().sum()), rel=1e-5)
        assert at(mon, "adam/v_max", step) == pytest.approx(float(v_all.max()), rel=1e-5)
        for mod, (rl, sl) in per_mod.items():
            r, sv = torch.cat(rl), torch.cat(sl)
            n = r.numel()
            assert at(mon, f"adam/ratio_std/{mod}", step) == pytest.approx(float(r.std(correction=0)), rel=1e-3, abs=1e-5), mod
            assert at(mon, f"adam/update_rms/{mod}", step) == pytest.approx(float(r.pow(2).mean().sqrt()), rel=1e-4), mod
            # fractions: a coordinate right at a threshold may round either way in float32
            assert abs(at(mon, f"adam/ratio_bimodal/{mod}", step) - float((r.abs() > 0.9).double().mean())) <= 2 / n + 1e-7, mod
            dominated = float((sv < eps).double().mean())
            saw_eps_dominated |= 0 < dominated < 1
            assert abs(at(mon, f"adam/eps_dominated/{mod}", step) - dominated) <= 2 / n + 1e-7, mod
    assert saw_eps_dominated
    mon.close()


def _feed_adam(grad_of_step, steps: int = 300, eps: float = 1e-8) -> dict[str, float]:
    """Feed chosen gradients to one 100x100 weight through AdamW(0.9, 0.95); Adam signals at the end."""
    model = nn.ModuleDict({"layer": nn.Linear(100, 100, bias=False)})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95), eps=eps, weight_decay=0.0)
    mon = Monitor(model, opt, probes=[AdamProbe(schedule=lambda s: s == steps - 1)], flush_every=10**6)
    w = model["layer"].weight
    g = torch.Generator().manual_seed(0)
    for s in range(steps):
        w.grad = grad_of_step(s, g, w.shape)
        opt.step()
        mon.step()
    mon.close()
    return {k: vs[0] for k, (_, vs) in mon.history.items()}


def test_adam_ratio_iid_gradients_methods_numbers():
    # METHODS.md §6: i.i.d. N(0,1) gradients -> std(r) 0.226 (theory sqrt(0.1/1.9) = 0.229), no bimodality
    out = _feed_adam(lambda s, g, shape: torch.randn(shape, generator=g))
    assert out["adam/ratio_std/layer"] == pytest.approx(0.226, abs=0.02)
    assert out["adam/ratio_bimodal/layer"] < 0.005
    assert out["adam/eps_dominated/layer"] == 0


def test_adam_ratio_correlated_gradients_methods_numbers():
    c = torch.randn(100, 100, generator=torch.Generator().manual_seed(5))
    # fully correlated (a constant gradient): |r| -> 1, bimodal at +-1
    out = _feed_adam(lambda s, g, shape: c)
    assert out["adam/ratio_bimodal/layer"] == 1.0
    assert out["adam/ratio_std/layer"] == pytest.approx(1.0, abs=0.02)
    # AR-mix 0.9 const + 0.1 noise: std(r) 0.936, fraction |r| > 0.9 = 0.82
    out = _feed_adam(lambda s, g, shape: 0.9 * c + 0.1 * torch.randn(shape, generator=g))
    assert out["adam/ratio_std/layer"] == pytest.approx(0.936, abs=0.02)
    assert out["adam/ratio_bimodal/layer"] == pytest.approx(0.82, abs=0.03)


def test_adam_update_rms_collapses_at_the_eps_scale():
    # Wortsman et al. §3.5 / METHODS §1.8: constant g = eps = 1e-8 -> |update| = g / (g + eps) = 0.5
    out = _feed_adam(lambda s, g, shape: torch.full(shape, 1e-8), steps=50)
    assert out["adam/update_rms/layer"] == pytest.approx(0.5, abs=1e-3)
    out = _feed_adam(lambda s, g, shape: torch.full(shape, 1e-9), steps=50)
    assert out["adam/update_rms/layer"] == pytest.approx(1 / 11, rel=1e-3)
    assert out["adam/eps_dominated/layer"] == 1.0
    out = _feed_adam(lambda s, g, shape: torch.full(shape, 1e-7), steps=50)
    assert out["adam/update_rms/layer"] == pytest.approx(1 / 1.1, rel=1e-3)
    assert out["adam/eps_dominated/layer"] == 0.0
    # half the coordinates below eps, half above
    half = torch.cat([torch.full((50, 100), 1e-9), torch.full((50, 100), -1e-7)])
    out = _feed_adam(lambda s, g, shape: half, steps=50)
    assert out["adam/eps_dominated/layer"] == 0.5
    assert out["adam/update_rms/layer"] == pytest.approx(math.sqrt(0.5 / 121 + 0.5 / 1.21), rel=1e-3)


# --------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------


def explicit_attention(qkv: torch.Tensor, n_head: int) -> tuple[float, float, float]:
    """(max |logit|, mean row entropy, min over heads of mean entropy) from a c_attn output."""
    B, Tq, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    q, k, _ = qkv.double().split(C, dim=2)
    q = q.view(B, Tq, n_head, hs).transpose(1, 2)
    k = k.view(B, Tq, n_head, hs).transpose(1, 2)
    att = q @ k.transpose(-2, -1) / math.sqrt(hs)  # (B, nh, T, T)
    future = torch.ones(Tq, Tq, dtype=torch.bool).triu(1)
    logit_max = float(att.masked_fill(future, 0.0).abs().max())
    p = torch.softmax(att.masked_fill(future, -math.inf), dim=-1)
    plogp = torch.where(p > 0, p * p.log(), torch.zeros_like(p))
    ent = -plogp.sum(-1)  # (B, nh, T)
    return logit_max, float(ent.mean()), float(ent.mean(dim=(0, 2)).min())


def test_attention_signals_vs_explicit_softmax():
    model = tiny_gpt(init_std=0.3)  # larger weights: non-trivial logits and entropies
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mon = Monitor(model, opt, probes="default", every=1, attention_sample=4, flush_every=1)
    captured = {}
    handles = [
        blk.attn.c_attn.register_forward_hook(lambda m, i, o, k=k: captured.__setitem__(k, o.detach().clone()))
        for k, blk in enumerate(model.transformer.h)
    ]
    for step in range(2):
        x, y = tokens(step, b=6)  # more sequences than attention_sample: the first 4 are used
        lm_step(model, opt, x, y, mon)
        for k in range(2):
            mx, ent, ent_min = explicit_attention(captured[k][:4], n_head=2)
            name = f"transformer.h.{k}.attn"
            assert at(mon, f"attn/logit_max/{name}", step) == pytest.approx(mx, rel=1e-5)
            assert at(mon, f"attn/entropy/{name}", step) == pytest.approx(ent, rel=1e-5)
            assert at(mon, f"attn/entropy_min/{name}", step) == pytest.approx(ent_min, rel=1e-5)
            assert ent_min < ent < math.log(T)
    for h in handles:
        h.remove()
    mon.close()


def test_uniform_attention_entropy_is_log_of_row_length():
    # Causal row i attends uniformly over i + 1 keys: entropy log(i + 1); the signal is the mean over rows.
    expected = float(np.mean(np.log(np.arange(1, T + 1))))
    mx, ent, ent_min = attention_stats(torch.zeros(2, 3, T, T).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf))
    assert float(mx) == 0 and float(ent) == pytest.approx(expected, rel=1e-6) and float(ent_min) == pytest.approx(expected, rel=1e-6)
    # the same through the model: zero q/k projections make every attention row uniform
    model = tiny_gpt()
    with torch.no_grad():
        for blk in model.transformer.h:
            blk.attn.c_attn.weight.zero_()
            blk.attn.c_attn.bias.zero_()
    mon = Monitor(model, torch.optim.AdamW(model.parameters()), probes="default", every=1, flush_every=1)
    x, y = tokens(0)
    mon.step(model(x, y)[1])
    for k in range(2):
        assert last(mon, f"attn/logit_max/transformer.h.{k}.attn") == 0
        assert last(mon, f"attn/entropy/transformer.h.{k}.attn") == pytest.approx(expected, rel=1e-6)
        assert last(mon, f"attn/entropy_min/transformer.h.{k}.attn") == pytest.approx(expected, rel=1e-6)
    mon.close()


# --------------------------------------------------------------------------
# output logits
# --------------------------------------------------------------------------


def test_logit_signals_vs_logsumexp():
    model = tiny_gpt(init_std=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mon = Monitor(model, opt, probes="default", every=1, flush_every=1)
    for step in range(2):
        x, y = tokens(step)
        logits, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(loss)
        z = logits.detach().double().reshape(-1, V)
        logz = torch.logsumexp(z, dim=-1)
        assert at(mon, "logits/logz_mean", step) == pytest.approx(float(logz.mean()), rel=1e-5)
        assert at(mon, "logits/logz_absmax", step) == pytest.approx(float(logz.abs().max()), rel=1e-5)
        assert at(mon, "logits/max", step) == pytest.approx(float(z.max()), rel=1e-6)
        assert at(mon, "logits/softmax_collapse", step) == 0
        assert at(mon, "logits/zero_loss_frac", step) == 0
    mon.close()


def one_hot_gap(gap: float, classes: int = 113, dtype=torch.float32) -> torch.Tensor:
    """One logit at ``gap``, the others at 0. The large logit sits first, as in METHODS.md's
    measurement: the reduction order moves the exact threshold (fp32, 113 classes: 19.28 with the
    large logit first or last, 21.24 at index 7)."""
    z = torch.zeros(1, classes, dtype=dtype)
    z[0, 0] = gap
    return z


@pytest.mark.parametrize(
    "dtype,classes,below,above",
    [
        (torch.float32, 113, 10.0, 25.0),  # METHODS §5.2: gap 25 collapses in fp32, gap 10 does not
        (torch.float32, 113, 18.5, 20.0),  # threshold 19.28
        (torch.float16, 113, 11.8, 12.9),  # threshold 12.34
        (torch.float64, 113, 39.5, 40.6),  # threshold 40.07
        (torch.float32, 2, 16.0, 17.3),  # threshold 16.64
        (torch.float64, 2, 36.0, 37.5),  # threshold 36.74
    ],
)
def test_softmax_collapse_thresholds_from_methods(dtype, classes, below, above):
    assert float(logit_stats(one_hot_gap(below, classes, dtype))["logits/softmax_collapse"]) == 0
    assert float(logit_stats(one_hot_gap(above, classes, dtype))["logits/softmax_collapse"]) == 1


class FixedLogits(nn.Module):
    """Returns the given logits (plus 0 * a parameter, so there is something to train)."""

    def __init__(self, z: torch.Tensor):
        super().__init__()
        self.z = z
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.z + 0 * self.w


def test_softmax_collapse_and_zero_loss_fraction_through_the_monitor():
    gaps = [10.0, 25.0, 10.0, 100.0, 5.0, 10.0, 10.0, 10.0]
    z = torch.cat([one_hot_gap(g) for g in gaps])
    model = FixedLogits(z)
    mon = Monitor(model, probes=[LogitsProbe(schedule=every(1))], flush_every=1)
    out = model(None)
    mon.step(out.sum())
    # collapsed rows: sum(exp(z - max)) == 1 in fp32; zero-loss rows: cross-entropy of the argmax is exactly 0
    ref_collapse = float((torch.exp(z - z.max(-1, keepdim=True).values).sum(-1) == 1).float().mean())
    ref_zero = float((F.cross_entropy(z, z.argmax(-1), reduction="none") == 0).float().mean())
    assert ref_collapse == ref_zero == 2 / 8
    assert last(mon, "logits/softmax_collapse") == ref_collapse
    assert last(mon, "logits/zero_loss_frac") == ref_zero
    mon.close()


# --------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------


def test_activation_signals_vs_block_outputs():
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mon = Monitor(model, opt, probes="default", every=1, flush_every=1)
    captured = {}
    handles = [
        blk.register_forward_hook(lambda m, i, o, k=k: captured.__setitem__(k, o.detach().clone()))
        for k, blk in enumerate(model.transformer.h)
    ]
    for step in range(2):
        lm_step(model, opt, *tokens(step), mon)
        for k in range(2):
            x = captured[k].double()
            assert at(mon, f"act/rms/transformer.h.{k}", step) == pytest.approx(float(x.pow(2).mean().sqrt()), rel=1e-5)
            assert at(mon, f"act/max/transformer.h.{k}", step) == pytest.approx(float(x.abs().max()), rel=1e-6)
    for h in handles:
        h.remove()
    mon.close()


# --------------------------------------------------------------------------
# loss and spike score
# --------------------------------------------------------------------------


def spike_scores(values) -> list[float]:
    probe = LossProbe()
    return [float(probe.collect(i, torch.tensor(v))["loss/spike_score"]) for i, v in enumerate(values)]


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    level=st.floats(-100, 100),
    sigma=st.floats(1e-2, 1e2),
)
def test_spike_score_flags_a_10_sigma_spike_and_not_stationary_noise(seed, level, sigma):
    rng = np.random.default_rng(seed)
    noise = (level + sigma * rng.standard_normal(100)).tolist()
    scores = spike_scores(noise + [level + 10 * sigma])
    assert scores[-1] > 6
    assert sum(s > 6 for s in scores[:-1]) <= 1  # stationary noise: at most a rare false alarm


def test_spike_score_false_alarm_rate_on_fixed_seeds():
    false_alarms = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        false_alarms += sum(s > 6 for s in spike_scores((3.0 + 0.1 * rng.standard_normal(300)).tolist()))
    assert false_alarms <= 2  # of 6000 steps


def test_loss_is_recorded_as_given():
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mon = Monitor(model, opt, probes="minimal", flush_every=1)
    for step in range(3):
        loss = lm_step(model, opt, *tokens(step), mon)
        assert at(mon, "loss", step) == float(loss)
        assert at(mon, "loss/spike_score", step) == 0  # warm-up: no score for the first values
    mon.close()


# --------------------------------------------------------------------------
# curvature
# --------------------------------------------------------------------------


def dense_hessian(model: nn.Module, loss_of_params) -> torch.Tensor:
    """Dense Hessian (float64) of ``loss_of_params(param_dict)`` over the flat parameter vector."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    numels = [p.numel() for p in model.parameters()]
    flat = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])

    def f(v):
        return loss_of_params({n: c.reshape(s) for n, c, s in zip(names, torch.split(v, numels), shapes)})

    return torch.autograd.functional.hessian(f, flat)


def test_curvature_probe_vs_dense_hessian():
    torch.manual_seed(0)
    model = MLP(d_in=3, d_hidden=5, d_out=2)
    dim = sum(p.numel() for p in model.parameters())  # 32
    g = torch.Generator().manual_seed(7)
    px, py = torch.randn(16, 3, generator=g), torch.randint(0, 2, (16,), generator=g)

    def probe_loss(m):
        return F.cross_entropy(m(px), py)

    b1, b2, eps = 0.9, 0.95, 1e-8
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(b1, b2), eps=eps)
    probe = CurvatureProbe(probe_loss, schedule=every(1), iters=dim, trace=True, trace_samples=30)
    mon = Monitor(model, opt, probes=[probe], flush_every=1)
    double = copy.deepcopy(model).double()
    for step, lr in enumerate([1e-2, 3e-3, 5e-2]):
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(loss)

        double.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
        H = dense_hessian(double, lambda pd: F.cross_entropy(functional_call(double, pd, (px.double(),)), py))
        eig = torch.linalg.eigvalsh(H)
        assert at(mon, "hessian/max_eig", step) == pytest.approx(float(eig[-1]), rel=1e-4)
        # preconditioned: P = (1 - b1^t)(sqrt(v_hat) + eps) from the optimizer state (Cohen 2022), t = step + 1
        P = (1 - b1 ** (step + 1)) * torch.cat([
            (opt.state[p]["exp_avg_sq"].double() / (1 - b2 ** (step + 1))).sqrt().reshape(-1) + eps
            for p in model.parameters()
        ])
        Hp = H / P.sqrt()[:, None] / P.sqrt()[None, :]
        assert at(mon, "hessian/max_eig_precond", step) == pytest.approx(float(torch.linalg.eigvalsh(Hp)[-1]), rel=1e-4)
        # AdamW, beta1 0.9: (2 + 2 beta1) / ((1 - beta1) lr) = 38 / lr at the current lr
        assert at(mon, "hessian/threshold", step) == pytest.approx(38 / lr, rel=1e-6)
        # Hutchinson with the probe's seed (seed + step) on the dense Hessian gives the same estimate
        ref_trace = float(hutchinson_trace(lambda v, H=H: H @ v, dim, samples=30, seed=step))
        assert at(mon, "hessian/trace", step) == pytest.approx(ref_trace, rel=1e-4, abs=1e-4 * float(eig.abs().sum()))
        assert at(mon, "hessian/trace", step) == pytest.approx(float(eig.sum()), rel=0.5)
    mon.close()


def test_preconditioned_sharpness_drops_parameters_the_optimizer_does_not_move():
    torch.manual_seed(0)
    model = MLP(d_in=3, d_hidden=4, d_out=2)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    opt = torch.optim.Adam(model.fc2.parameters(), lr=1e-2, betas=(0.9, 0.95))  # fc1 is trained by no one
    dim = sum(p.numel() for p in model.parameters())
    mon = Monitor(model, opt, probes=[CurvatureProbe(lambda m: F.cross_entropy(m(x), y), schedule=every(1), iters=dim)], flush_every=1)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    mon.step(loss)
    double = copy.deepcopy(model).double()
    H = dense_hessian(double, lambda pd: F.cross_entropy(functional_call(double, pd, (x.double(),)), y))
    n1 = sum(p.numel() for p in model.fc1.parameters())
    P = (1 - 0.9) * torch.cat([  # (1 - b1^t)(sqrt(v_hat) + eps) at t = 1 (Cohen 2022)
        (opt.state[p]["exp_avg_sq"].double() / (1 - 0.95)).sqrt().reshape(-1) + 1e-8
        for p in model.fc2.parameters()
    ])
    H22 = H[n1:, n1:] / P.sqrt()[:, None] / P.sqrt()[None, :]
    assert last(mon, "hessian/max_eig_precond") == pytest.approx(float(torch.linalg.eigvalsh(H22)[-1]), rel=1e-4)
    assert last(mon, "hessian/max_eig") == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-4)
    mon.close()


def test_curvature_probe_sgd_threshold_and_no_preconditioned_signal():
    torch.manual_seed(0)
    model = MLP()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mon = Monitor(model, opt, probes=[CurvatureProbe(lambda m: F.cross_entropy(m(x), y), schedule=every(1), iters=5)], flush_every=1)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    mon.step(loss)
    assert last(mon, "hessian/threshold") == pytest.approx((2 + 2 * 0.9) / 0.1, rel=1e-6)
    assert "hessian/max_eig_precond" not in mon.history
    assert math.isfinite(last(mon, "hessian/max_eig"))
    mon.close()


class NoisyMLP(nn.Module):
    """Buffers (BatchNorm running stats) and randomness (dropout): what a probe must leave alone."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


def test_curvature_probe_leaves_training_state_untouched():
    torch.manual_seed(0)
    model = NoisyMLP()
    px, py = torch.randn(10, 6), torch.randint(0, 3, (10,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def eval_loss(m):
        m.eval()  # allowed: the probe restores train/eval flags
        return F.cross_entropy(m(px), py)

    probes = [
        CurvatureProbe(lambda m: F.cross_entropy(m(px), py), schedule=every(1), iters=8, trace=True),  # BN stats + dropout RNG
        CurvatureProbe(eval_loss, name="hessian_eval", schedule=every(1), iters=8),
    ]
    mon = Monitor(model, opt, probes=probes)
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    state = copy.deepcopy(model.state_dict())  # parameters and buffers
    grads = [p.grad.clone() for p in model.parameters()]
    opt_state = copy.deepcopy(opt.state_dict())
    rng = torch.get_rng_state()
    modes = [m.training for m in model.modules()]
    mon.step(loss)
    mon.flush()
    assert {"hessian/max_eig", "hessian/trace", "hessian_eval/max_eig"} <= set(mon.history)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    for k, s in opt.state_dict()["state"].items():
        assert all(torch.equal(s[n], opt_state["state"][k][n]) for n in s)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    mon.close()


def test_full_preset_wires_the_curvature_probe():
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = tokens(0)

    def probe_loss(m):
        return m(x, y)[1]

    mon = Monitor(model, opt, probes="full", probe_loss=probe_loss)
    curv = [p for p in mon.probes if isinstance(p, CurvatureProbe)]
    assert [p.name for p in curv] == ["hessian"]
    assert [s for s in range(1200) if curv[0].schedule(s)] == [0, 500, 1000]
    assert not mon.disabled
    mon.close()
    for kwargs in (dict(probes="full"), dict(probes="default", probe_loss=probe_loss), dict(probes="minimal", probe_loss=probe_loss)):
        mon = Monitor(model, opt, **kwargs)
        assert not any(isinstance(p, CurvatureProbe) for p in mon.probes), kwargs
        mon.close()
    probes = build_probes("full", 10, probe_loss=probe_loss)
    assert [s for s in range(1200) if probes[-1].schedule(s)] == [0, 500, 1000]
    probes = build_probes("full", 10, probe_loss=probe_loss, curvature_every=100)
    assert [s for s in range(250) if probes[-1].schedule(s)] == [0, 100, 200]
    probes = build_probes("full", 300, probe_loss=probe_loss, curvature_every=100)
    assert [s for s in range(700) if probes[-1].schedule(s)] == [0, 300, 600]
    mon = Monitor(model, opt, probes="full", probe_loss=probe_loss, curvature_every=50)
    assert [s for s in range(120) if mon.probes[-1].schedule(s)] == [0, 50, 100]
    mon.close()
    with pytest.raises(ValueError, match="curvature_every"):
        build_probes("full", probe_loss=probe_loss, curvature_every=-3)


# --------------------------------------------------------------------------
# observation does not perturb training
# --------------------------------------------------------------------------


def test_proxy_train_losses_are_bitwise_identical_with_the_full_monitor():
    from seismo.proxy.train import TrainConfig, train

    def run(monitor: str):
        cfg = TrainConfig(
            steps=20, batch_size=4, seq_len=T, eval_every=0, eval_batches=1, log_every=5, monitor=monitor,
            monitor_every=1 if monitor != "none" else 0,
        )
        cfg.model = tiny_cfg(dropout=0.1)
        cfg.data.max_bytes = 20_000
        cfg.optim.warmup_steps = 5
        cfg.optim.grad_clip = 1.0
        return train(cfg)

    plain, watched = run("none"), run("full")
    assert watched.history and "attn/entropy/transformer.h.0.attn" in watched.history
    assert np.array_equal(plain.train_loss, watched.train_loss)
    assert plain.final_val_loss == watched.final_val_loss


def test_hand_loop_with_full_preset_and_curvature_every_step_is_bitwise_identical():
    def run(watch: bool):
        model = tiny_gpt(dropout=0.1)  # dropout: the probes must not consume the global RNG
        opt = torch.optim.AdamW(model.parameters(), lr=3e-2, betas=(0.9, 0.95))
        px, py = tokens(99, b=2)
        mon = None
        if watch:
            probes = build_probes("full", 1, probe_loss=lambda m: m(px, py)[1])
            curv = probes[-1]
            assert isinstance(curv, CurvatureProbe)
            curv.schedule, curv.iters, curv.trace, curv.trace_samples = every(1), 4, True, 2
            mon = Monitor(model, opt, probes=probes, flush_every=7)
        losses = []
        for step in range(20):
            x, y = tokens(step)
            losses.append(lm_step(model, opt, x, y, mon, clip=1.0).detach())
        if mon is not None:
            mon.close()
            assert len(mon.history["hessian/max_eig"][0]) == 20 and not mon.disabled
        return torch.stack(losses), model.state_dict(), opt.state_dict()["state"]

    l0, p0, s0 = run(False)
    l1, p1, s1 = run(True)
    assert torch.equal(l0, l1)
    assert all(torch.equal(p0[k], p1[k]) for k in p0)
    assert all(torch.equal(s0[i][k], s1[i][k]) for i in s0 for k in s0[i])


# --------------------------------------------------------------------------
# no host synchronisation
# --------------------------------------------------------------------------

SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


@contextmanager
def count_seismo_syncs():
    """Count host-synchronising tensor calls made from seismo's own code (any frame in seismo/)."""
    calls: list[str] = []
    saved = {n: torch.Tensor.__dict__.get(n) for n in SYNC_METHODS}

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            if "/seismo/" in caller and "/tests/" not in caller:
                calls.append(f"{name} from {caller}:{sys._getframe(1).f_lineno}")
            return fn(self, *args, **kwargs)

        return counted

    for n in SYNC_METHODS:
        setattr(torch.Tensor, n, wrap(n, getattr(torch.Tensor, n)))
    try:
        yield calls
    finally:
        for n, fn in saved.items():
            if fn is None:
                delattr(torch.Tensor, n)
            else:
                setattr(torch.Tensor, n, fn)


def hooks_installed(model: nn.Module) -> int:
    n = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return n + sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters())


def test_no_host_sync_before_flush_and_no_hooks_on_untracked_steps():
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mon = Monitor(model, opt, every=10, flush_every=50)
    assert len(mon.probes) == 7 and not mon.disabled
    for step in range(30):
        x, y = tokens(step)
        tracked = step % 10 == 0
        # per-step hooks only before tracked steps; forward hooks stay (gated: torch.compile keeps its graph)
        grad_hooks = sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters())
        assert (grad_hooks > 0) == tracked, step
        with count_seismo_syncs() as calls:
            _, loss = model(x, y)  # forward hooks (attention, logits, activations)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # gradient hooks
            opt.step()  # update / Adam hooks (torch's own .item() calls are not counted)
            record = mon.step(loss)
        assert calls == [], (step, calls)
        assert (record is not None) == tracked
    assert mon.history == {}  # nothing was moved to the host yet
    with count_seismo_syncs() as calls:
        mon.flush()
    assert calls  # the counter works: flush is where the transfer happens
    assert mon.series("grad/norm")[0] == [0, 10, 20]
    mon.close()


# --------------------------------------------------------------------------
# failures: a probe that raises is disabled with one warning; training goes on
# --------------------------------------------------------------------------


class RaisingCollect:
    def __init__(self, name="broken_collect"):
        self.name = name
        self.schedule = every(1)

    def attach(self, ctx):
        pass

    def arm(self, step):
        pass

    def collect(self, step, loss):
        raise ValueError("collect exploded")

    def detach(self):
        pass


class RaisingHook:
    """Installs a forward hook (through HookSet, as built-in probes do) that raises."""

    def __init__(self, name="broken_hook"):
        self.name = name
        self.schedule = every(1)
        self.detached = 0

    def attach(self, ctx: ProbeContext):
        self.model = ctx.model
        self.hooks = HookSet(self.name, ctx.on_error)

    def arm(self, step):
        def hook(mod, inputs, output):
            raise ValueError("hook exploded")

        self.hooks.add(self.model.register_forward_hook(self.hooks.guard(hook)))

    def collect(self, step, loss):
        self.hooks.remove()
        return {}

    def detach(self):
        self.detached += 1
        self.hooks.remove()


@pytest.mark.parametrize("broken", [RaisingCollect, RaisingHook])
def test_a_raising_probe_is_disabled_with_one_warning(broken):
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    bad = broken()
    mon = Monitor(model, opt, probes=[LossProbe(), bad, GradientProbe()], flush_every=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):
            lm_step(model, opt, *tokens(step), mon)
    mine = [w for w in caught if bad.name in str(w.message)]
    assert len(mine) == 1 and mine[0].category is RuntimeWarning
    assert "exploded" in str(mine[0].message)
    assert list(mon.disabled) == [bad.name]
    assert [p.name for p in mon.probes] == ["loss", "grad"]
    assert mon.series("loss")[0] == [0, 1, 2, 3]
    assert mon.series("grad/norm")[0] == [0, 1, 2, 3]
    # what is left armed for the next step: the gradient probe's per-parameter hooks, nothing of the broken probe
    assert hooks_installed(model) == sum(1 for _ in model.parameters())
    mon.close()


def test_logits_probe_on_output_without_logits_is_disabled_from_its_hook():
    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return {"out": self.fc(x)}

    model = DictOut()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = Monitor(model, probes="default", every=1, flush_every=1)
        for _ in range(3):
            loss = model(torch.randn(3, 4))["out"].pow(2).mean()
            loss.backward()
            mon.step(loss)
    assert "holds no logits tensor" in mon.disabled["logits"]
    assert sum("'logits'" in str(w.message) for w in caught) == 1
    assert len(mon.series("grad/norm")[0]) == 3
    mon.close()


# --------------------------------------------------------------------------
# clear messages
# --------------------------------------------------------------------------


def monitor_warnings(*args, **kwargs) -> tuple[Monitor, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = Monitor(*args, **kwargs)
    return mon, [str(w.message) for w in caught if w.category is RuntimeWarning]


def test_unknown_output_module_name_is_reported():
    model = tiny_gpt()
    mon, msgs = monitor_warnings(model, torch.optim.AdamW(model.parameters()), probes="default", output="transformer.nope")
    assert "no module named 'transformer.nope'" in mon.disabled["logits"]
    assert "lm_head" in mon.disabled["logits"]  # the message lists the last linear layers
    assert len(msgs) == 1 and "'logits'" in msgs[0]
    mon.close()


def test_model_without_attention_turns_the_attention_probe_off_with_a_message():
    model = MLP()
    mon, _ = monitor_warnings(model, torch.optim.AdamW(model.parameters()), probes="default")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon.step(model(torch.randn(4, 6)).pow(2).mean())  # attention is found by watching the first tracked step
    assert "found no attention" in mon.disabled["attn"]
    assert any("'attn' is off" in str(w.message) for w in caught)
    assert "logits" in [p.name for p in mon.probes]
    mon.close()


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_turns_the_adam_probe_off_with_a_message(momentum):
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = Monitor(model, opt, probes="default", every=1, flush_every=1)
        for _ in range(2):
            loss = model(torch.randn(4, 6)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss)
    assert "exp_avg" in mon.disabled["adam"]
    assert sum("'adam' is off" in str(w.message) for w in caught) == 1
    assert "update/norm" in mon.history  # the other optimizer-side probe still works
    mon.close()


def test_bad_arguments_raise():
    with pytest.raises(ConfigError, match=r"^model: expected a torch.nn.Module, got builtins.str$"):
        Monitor("not a module")
    with pytest.raises(ConfigError, match=r"^optimizer: .* got builtins.str$"):
        Monitor(MLP(), "adam")
    with pytest.raises(ConfigError, match="MonitorConfig.preset: unknown monitor preset 'everything'"):
        Monitor(MLP(), probes="everything")
    with pytest.raises(TypeError, match="probe_loss"):
        CurvatureProbe("not callable")


# --------------------------------------------------------------------------
# metric names are public API
# --------------------------------------------------------------------------

_MODULES = [
    "lm_head",
    "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.ln_1", "transformer.h.0.ln_2",
    "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj",
    "transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj", "transformer.h.1.ln_1", "transformer.h.1.ln_2",
    "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj",
    "transformer.ln_f", "transformer.wpe", "transformer.wte",
]

FULL_PRESET_NAMES = sorted(
    [
        "act/max/transformer.h.0", "act/max/transformer.h.1", "act/rms/transformer.h.0", "act/rms/transformer.h.1",
        "adam/update_grad_cos", "adam/v_l1", "adam/v_max",
        "attn/entropy/transformer.h.0.attn", "attn/entropy/transformer.h.1.attn",
        "attn/entropy_min/transformer.h.0.attn", "attn/entropy_min/transformer.h.1.attn",
        "attn/logit_max/transformer.h.0.attn", "attn/logit_max/transformer.h.1.attn",
        "grad/nonfinite", "grad/norm",
        "hessian/max_eig", "hessian/max_eig_precond", "hessian/threshold",
        "logits/logz_absmax", "logits/logz_mean", "logits/max", "logits/softmax_collapse", "logits/zero_loss_frac",
        "loss", "loss/spike_score",
        "param/norm", "update/norm",
    ]
    + [
        f"{family}/{mod}"
        for family in (
            "adam/eps_dominated", "adam/ratio_bimodal", "adam/ratio_std", "adam/update_rms",
            "grad/norm", "grad/rms", "param/norm", "update/ratio",
        )
        for mod in _MODULES
    ]
)

# family/metric[/module]; the loss itself is the one bare name.
NAME_PATTERN = re.compile(r"^(loss|[a-z]+/[a-z][a-z0-9_]*(/[A-Za-z0-9_.\-]+)?)$")


def test_full_preset_metric_names_are_frozen():
    model = tiny_gpt()
    assert model.config.n_layer == 2
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    px, py = tokens(99, b=2)
    mon = Monitor(model, opt, probes="full", probe_loss=lambda m: m(px, py)[1], flush_every=1)
    lm_step(model, opt, *tokens(0), mon)
    mon.close()
    assert len(FULL_PRESET_NAMES) == 155
    assert sorted(mon.history) == FULL_PRESET_NAMES


def test_every_recorded_signal_name_matches_the_pattern_and_is_documented():
    """The names a monitor actually records with every built-in probe (the full preset, curvature
    included, and the opt-in outlier and staleness probes) follow ``family/metric[/module]``
    and each ``family/metric`` is listed in docs/MONITOR.md."""
    from seismo.monitor import AdamStalenessProbe, OutlierProbe, build_probes

    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    px, py = tokens(99, b=2)
    probes = build_probes("full", probe_loss=lambda m: m(px, py)[1]) + [OutlierProbe(), AdamStalenessProbe()]
    mon = Monitor(model, opt, probes=probes, flush_every=1)
    for seed in range(2):
        lm_step(model, opt, *tokens(seed), mon)
    mon.close()
    names = set(mon.history)
    assert {"loss", "grad/norm", "hessian/max_eig", "outlier/kurtosis/transformer.h.0", "adam/stale_frac"} <= names, sorted(names)
    assert [n for n in names if not NAME_PATTERN.match(n)] == []
    doc = (Path(__file__).resolve().parents[2] / "docs" / "MONITOR.md").read_text()
    undocumented = sorted({"/".join(n.split("/")[:2]) for n in names if "/" in n} - {m for m in re.findall(r"[a-z]+/[a-z0-9_]+", doc)})
    assert undocumented == []
    # and the pattern rejects what it should
    for wrong in ("Grad/norm", "grad", "grad//x", "grad/norm/a b", "/grad/norm"):
        assert not NAME_PATTERN.match(wrong), wrong


# --------------------------------------------------------------------------
# the run store
# --------------------------------------------------------------------------


def test_store_round_trip_matches_history(tmp_path):
    path = tmp_path / "runs.sqlite"
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mon = Monitor(model, opt, store=str(path), run_name="oracle", probes="default", every=2, flush_every=3, config={"lr": 1e-2})
    assert mon.run_id is not None
    for step in range(7):
        lm_step(model, opt, *tokens(step), mon)
    mon.log({"val/loss": 3.25}, step=6)
    mon.close()
    run = load_run(path, mon.run_id)
    assert run.info.name == "oracle" and run.info.status == "completed" and run.info.config == {"lr": 1e-2}
    assert set(run.metrics) == set(mon.history)
    for name, (steps, values) in mon.history.items():
        s, v = run.series(name)
        assert s.tolist() == steps, name
        np.testing.assert_array_equal(v, np.asarray(values, dtype=np.float64), err_msg=name)
    assert run.series("grad/norm")[0].tolist() == [0, 2, 4, 6]
    assert run.series("val/loss")[1].tolist() == [3.25]
    assert run.series("adam/v_max")[0].tolist() == [0, 2, 4, 6]
    # a second monitor on the same store makes a second run
    mon2 = Monitor(model, opt, store=str(path), run_name="second", probes="minimal")
    mon2.close()
    assert mon2.run_id != mon.run_id
