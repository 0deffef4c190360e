"""TinyGPT (seismo.proxy.model): every config switch does what its paper says.

Oracles are slow, explicit re-implementations written here (attention from the q/k/v
projections, StableMax from its definition, the spectral norm from an SVD), plus the bounds the
papers state (Cauchy-Schwarz for qk-layernorm, the Swin V2 clamp at 100).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from seismo.mitigate.losses import StableMax, stablemax, stablemax_cross_entropy
from seismo.mitigate.model_edits import SigmaReparam
from seismo.mitigate.param_groups import mup_param_groups
from seismo.proxy.model import ConfigError, GPTConfig, TinyGPT
from seismo.proxy.train import OptimConfig, build_optimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


V, T, C, H = 64, 16, 32, 4  # small sizes: vocab, sequence, width, heads


def make(seed: int = 0, **kw) -> TinyGPT:
    base = dict(vocab_size=V, block_size=T, n_layer=2, n_head=H, n_embd=C)
    base.update(kw)
    torch.manual_seed(seed)
    return TinyGPT(GPTConfig(**base))


def tokens(b: int = 3, t: int = T, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (b, t), generator=g)


def capture(module: nn.Module, store: list, what: str = "output"):
    """Forward hook appending the module's (first) input or its output to ``store``."""

    def hook(mod, inputs, output):
        store.append((inputs[0] if what == "input" else output).detach().clone())

    return module.register_forward_hook(hook)


def qkv(attn: nn.Module, x: torch.Tensor):
    """Explicit (B, nh, T, hs) q, k, v from an attention module's c_attn."""
    B, Tn, Cn = x.shape
    q, k, v = attn.c_attn(x).split(Cn, dim=2)
    shape = lambda z: z.view(B, Tn, attn.n_head, Cn // attn.n_head).transpose(1, 2)  # noqa: E731
    return shape(q), shape(k), shape(v)


def causal(att: torch.Tensor) -> torch.Tensor:
    Tn = att.size(-1)
    mask = torch.ones(Tn, Tn, dtype=torch.bool).triu(1)
    return att.masked_fill(mask, float("-inf"))


def assert_normalized(x: torch.Tensor, tol: float = 2e-3) -> None:
    """Per row of the last axis: zero mean and unit (biased) variance, as LayerNorm with default affine."""
    mean = x.mean(-1)
    var = x.var(-1, unbiased=False)
    assert mean.abs().max() < tol, f"row means up to {mean.abs().max():.2e}"
    assert (var - 1).abs().max() < tol, f"row variances off by up to {(var - 1).abs().max():.2e}"


# --------------------------------------------------------------------------------------
# qk-layernorm (Dehghani et al. 2023; Wortsman et al. 2023 §3.1)
# --------------------------------------------------------------------------------------
def test_qk_norm_normalizes_q_and_k_per_head():
    model = make(qk_norm=True)
    attn = model.transformer.h[0].attn
    qs, ks, q_raw, k_raw = [], [], [], []
    capture(attn.qk_norm.q_norm, qs)
    capture(attn.qk_norm.k_norm, ks)
    capture(attn.qk_norm.q_norm, q_raw, "input")
    capture(attn.qk_norm.k_norm, k_raw, "input")
    with torch.no_grad():
        model(tokens())
    for normed, raw in ((qs[0], q_raw[0]), (ks[0], k_raw[0])):
        assert normed.shape == (3, H, T, C // H)  # (B, nh, T, hs): normalized per head
        # zero mean, unit variance up to LayerNorm's eps (var = v / (v + eps); q is small at init)
        assert_normalized(normed, tol=2e-2)
        mu = raw.mean(-1, keepdim=True)
        var = raw.var(-1, unbiased=False, keepdim=True)
        torch.testing.assert_close(normed, (raw - mu) / torch.sqrt(var + 1e-5), rtol=1e-4, atol=1e-5)


def test_qk_norm_bounds_attention_logits_by_sqrt_head_dim():
    """|q.k| <= |q||k| = hs for zero-mean unit-variance rows, so |q.k / sqrt(hs)| <= sqrt(hs),
    however large the projection weights are."""
    hs = C // H
    maxes = {}
    for qk in (False, True):
        model = make(qk_norm=qk)
        with torch.no_grad():
            for block in model.transformer.h:
                block.attn.c_attn.weight.mul_(50.0)  # blow up q and k
        seen = []
        for block in model.transformer.h:
            block.attn.logit_tap.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o))
        with torch.no_grad():
            model(tokens())
        maxes[qk] = max(float(z[torch.isfinite(z)].abs().max()) for z in seen)
    assert maxes[True] <= math.sqrt(hs) * (1 + 1e-4)
    assert maxes[False] > 10 * math.sqrt(hs)  # the bound is not trivially met without the norm


# --------------------------------------------------------------------------------------
# Scaled cosine attention (Swin V2, arXiv 2111.09883)
# --------------------------------------------------------------------------------------
def test_cosine_logit_scale_init_is_log10_per_head():
    model = make(attention="cosine")
    for block in model.transformer.h:
        ls = block.attn.logit_scale
        assert isinstance(ls, nn.Parameter)
        assert ls.numel() == H
        torch.testing.assert_close(ls.detach().flatten(), torch.full((H,), math.log(10.0)))


def test_cosine_scale_is_clamped_at_100():
    model = make(attention="cosine", n_layer=1)
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        attn.logit_scale.fill_(10.0)  # exp(10) = 22026 without the clamp
        w = attn.c_attn.weight
        w[C : 2 * C] = w[:C]  # k == q, so the diagonal cosine is exactly 1
        if attn.c_attn.bias is not None:
            attn.c_attn.bias[C : 2 * C] = attn.c_attn.bias[:C]
    seen = []
    attn.logit_tap.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o))
    with torch.no_grad():
        model(tokens())
    z = seen[0]
    finite = z[torch.isfinite(z)]
    assert finite.abs().max() <= 100.0 * (1 + 1e-5)
    diag = torch.diagonal(z, dim1=-2, dim2=-1)
    torch.testing.assert_close(diag, torch.full_like(diag, 100.0), rtol=1e-5, atol=1e-4)


def test_cosine_attention_matches_explicit_reference():
    model = make(attention="cosine", n_layer=1)
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        attn.logit_scale.copy_(torch.tensor([0.5, 1.5, 2.5, 6.0]).view(H, 1, 1))  # last one clamps
    x = torch.randn(2, T, C, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = attn(x)
        q, k, v = qkv(attn, x)
        scale = torch.exp(torch.clamp(attn.logit_scale, max=math.log(100.0)))  # (nh, 1, 1)
        att = (q / q.norm(dim=-1, keepdim=True)) @ (k / k.norm(dim=-1, keepdim=True)).transpose(-2, -1) * scale
        att = torch.softmax(causal(att), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(2, T, C)
        want = attn.c_proj(y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# StableMax (Prieto et al. 2025, arXiv 2501.04697)
# --------------------------------------------------------------------------------------
def s_ref(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    for i, v in enumerate(x.flatten().tolist()):
        out.view(-1)[i] = v + 1.0 if v >= 0 else 1.0 / (1.0 - v)
    return out


def test_stablemax_worked_value():
    x = torch.tensor([-2.0, 0.0, 1.0, 3.0])
    want = torch.tensor([1.0, 3.0, 6.0, 12.0]) / 22.0
    torch.testing.assert_close(stablemax(x), want)
    torch.testing.assert_close(StableMax()(x), want)
    torch.testing.assert_close(s_ref(x), torch.tensor([1 / 3, 1.0, 2.0, 4.0]))


def test_stablemax_cross_entropy_ignores_minus_one():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g) * 3
    targets = torch.tensor([0, -1, 4, 2, -1, 1])
    got = stablemax_cross_entropy(logits, targets, ignore_index=-1)
    keep = targets != -1
    z = logits[keep].double()
    s = s_ref(z)
    want = -torch.log(s[torch.arange(int(keep.sum())), targets[keep]] / s.sum(-1)).mean()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)


def test_stablemax_output_loss_matches_reference():
    model = make(output="stablemax")
    with torch.no_grad():
        model.lm_head.weight.mul_(200.0)  # logits of order 10, where StableMax and softmax differ
    idx = tokens()
    targets = tokens(seed=2)
    targets[0, :5] = -1  # ignored positions
    logits, loss = model(idx, targets)
    z = logits.detach().reshape(-1, V).double()
    t = targets.reshape(-1)
    keep = t != -1
    s = s_ref(z[keep])
    want = -torch.log(s[torch.arange(int(keep.sum())), t[keep]] / s.sum(-1)).mean()
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-7)
    # and it is not the softmax loss
    ce = F.cross_entropy(logits.detach().reshape(-1, V), t, ignore_index=-1)
    assert abs(float(ce) - float(loss.detach())) > 0.1


# --------------------------------------------------------------------------------------
# sigmaReparam (Zhai et al. 2023, arXiv 2303.06296)
# --------------------------------------------------------------------------------------
def sr(mod: nn.Linear) -> SigmaReparam:
    return mod.parametrizations.weight[0]


def test_sigma_reparam_power_iteration_converges_to_spectral_norm():
    model = make(sigma_reparam=True)
    layer = model.transformer.h[0].attn.c_proj
    p = sr(layer)
    W = layer.parametrizations.weight.original
    with torch.no_grad():
        W.add_(0.02 * torch.randn(W.shape, generator=torch.Generator().manual_seed(5)))
    true_sigma = torch.linalg.matrix_norm(W.detach(), 2)
    layer.train()
    x = torch.randn(4, C)
    layer(x)
    first = float(p.sigma)
    assert abs(first - float(true_sigma)) / float(true_sigma) > 1e-3  # not exact from the SVD init
    with torch.no_grad():
        for _ in range(100):
            layer(x)
    torch.testing.assert_close(p.sigma, true_sigma, rtol=1e-5, atol=0)


def test_sigma_reparam_gamma_sigma0_is_identity_at_init():
    plain = make()
    model = make(sigma_reparam=True, sigma_gamma_init="sigma0")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert names and all(parametrize.is_parametrized(model.get_submodule(n), "weight") for n in names)
    for n in names:
        mod = model.get_submodule(n)
        torch.testing.assert_close(mod.weight, mod.parametrizations.weight.original, rtol=1e-5, atol=1e-6)
    idx = tokens()
    torch.testing.assert_close(model(idx)[0], plain(idx)[0], rtol=1e-4, atol=1e-5)


def test_sigma_reparam_gamma_one_has_unit_spectral_norm():
    model = make(sigma_reparam=True, sigma_gamma_init="one")
    model.eval()  # read the weights without advancing the power iteration
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            torch.testing.assert_close(torch.linalg.matrix_norm(mod.weight.detach(), 2), torch.tensor(1.0), rtol=1e-4, atol=0)


def test_sigma_reparam_eval_mode_does_not_update_u():
    model = make(sigma_reparam=True)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 2:
                p.add_(0.01 * torch.randn_like(p))
    us = {n: m.u.clone() for n, m in model.named_modules() if isinstance(m, SigmaReparam)}
    model.eval()
    with torch.no_grad():
        model(tokens())
        model(tokens())
    for n, m in model.named_modules():
        if isinstance(m, SigmaReparam):
            assert torch.equal(m.u, us[n]), n
    model.train()
    model(tokens())
    assert any(not torch.equal(m.u, us[n]) for n, m in model.named_modules() if isinstance(m, SigmaReparam))


def test_tied_weights_and_sigma_reparam_skip_lm_head():
    model = make(tie_weights=True, sigma_reparam=True)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not parametrize.is_parametrized(model.lm_head, "weight")
    assert parametrize.is_parametrized(model.transformer.h[0].attn.c_attn, "weight")
    untied = make(sigma_reparam=True)
    assert parametrize.is_parametrized(untied.lm_head, "weight")


# --------------------------------------------------------------------------------------
# Norm placement: pre (GPT-2), post, peri (Peri-LN, arXiv 2502.02732), res_post (Swin V2)
# --------------------------------------------------------------------------------------
def block_trace(norm: str, scale: float = 1.0):
    """Run one block on a (huge-scale) input; return x, output and the branch inputs/outputs."""
    model = make(norm=norm, n_layer=1, init_std=0.2)  # branch outputs well above LayerNorm's eps
    block = model.transformer.h[0]
    rec: dict[str, list] = {k: [] for k in ("attn_in", "attn_out", "mlp_in", "mlp_out")}
    capture(block.attn, rec["attn_in"], "input")
    capture(block.attn, rec["attn_out"])
    capture(block.mlp, rec["mlp_in"], "input")
    capture(block.mlp, rec["mlp_out"])
    x = scale * torch.randn(2, T, C, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = block(x)
    return block, x, out, {k: v[0] for k, v in rec.items()}


def test_pre_norm_block():
    block, x, out, r = block_trace("pre", scale=1000.0)
    assert_normalized(r["attn_in"])
    assert_normalized(r["mlp_in"])
    with torch.no_grad():
        torch.testing.assert_close(r["attn_in"], block.ln_1(x))
        h = x + r["attn_out"]
        torch.testing.assert_close(r["mlp_in"], block.ln_2(h))
    torch.testing.assert_close(out, h + r["mlp_out"])
    assert out.std() > 500  # the residual stream keeps its scale


def test_peri_norm_normalizes_branch_input_and_output_never_the_residual():
    block, x, out, r = block_trace("peri", scale=1000.0)
    assert_normalized(r["attn_in"])
    assert_normalized(r["mlp_in"])
    with torch.no_grad():
        a = block.ln_1_out(r["attn_out"])
        m = block.ln_2_out(r["mlp_out"])
        torch.testing.assert_close(r["attn_in"], block.ln_1(x))
        torch.testing.assert_close(r["mlp_in"], block.ln_2(x + a))
    assert_normalized(a)
    assert_normalized(m)
    torch.testing.assert_close(out - x, a + m, rtol=1e-4, atol=1e-2)  # |x| ~ 1e3: float32 cancellation
    # residual stream untouched: output has the input's scale, and it is not normalized per token
    assert 0.9 < float(out.std() / x.std()) < 1.1
    assert out.var(-1, unbiased=False).min() > 1e4


def test_post_norm_block_outputs_are_normalized():
    block, x, out, r = block_trace("post", scale=1000.0)
    torch.testing.assert_close(r["attn_in"], x)  # no pre-norm
    assert_normalized(out)
    model = make(norm="post", n_layer=2)
    outs = []
    for b in model.transformer.h:
        capture(b, outs)
    with torch.no_grad():
        model(tokens())
    assert len(outs) == 2
    for o in outs:
        assert_normalized(o)
    assert isinstance(model.transformer.ln_f, nn.Identity)


def test_res_post_norm_normalizes_branch_outputs_without_pre_norm():
    block, x, out, r = block_trace("res_post", scale=1000.0)
    assert torch.equal(r["attn_in"], x)  # attention sees the raw stream
    with torch.no_grad():
        a = block.ln_1(r["attn_out"])
        h = x + a
        m = block.ln_2(r["mlp_out"])
    torch.testing.assert_close(r["mlp_in"], h)  # the MLP sees the raw stream too
    assert_normalized(a)
    assert_normalized(m)
    torch.testing.assert_close(out, h + m)
    assert 0.9 < float(out.std() / x.std()) < 1.1


# --------------------------------------------------------------------------------------
# muP (Yang et al. 2022, arXiv 2203.03466; Wortsman et al. 2023 §3.4)
# --------------------------------------------------------------------------------------
def test_mup_attention_scale_is_one_over_head_dim():
    hs = C // H
    for param, scale in (("mup", 1.0 / hs), ("standard", 1.0 / math.sqrt(hs))):
        model = make(parametrization=param, mup_base_width=8, n_layer=1)
        attn = model.transformer.h[0].attn
        seen, xs = [], []
        attn.logit_tap.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o))
        capture(attn, xs, "input")
        with torch.no_grad():
            model(tokens())
            q, k, _ = qkv(attn, xs[0])
            want = causal((q @ k.transpose(-2, -1)) * scale)
        torch.testing.assert_close(seen[0], want[: seen[0].size(0)], rtol=1e-5, atol=1e-6)


def test_mup_readout_divided_by_width_mult():
    model = make(parametrization="mup", mup_base_width=8)
    assert model.config.width_mult == C / 8 == 4.0
    feats = []
    capture(model.transformer.ln_f, feats)
    idx = tokens()
    with torch.no_grad():
        logits, _ = model(idx)
        want = model.lm_head(feats[0]) / 4.0
    torch.testing.assert_close(logits, want)
    assert make().config.width_mult == 1.0


def test_mup_param_groups_and_build_optimizer():
    model = make(parametrization="mup", mup_base_width=8)
    width_mult = model.config.width_mult
    emb = {id(model.transformer.wte.weight), id(model.transformer.wpe.weight)}
    readout = {id(model.lm_head.weight)}
    hidden = {id(p) for n, p in model.named_parameters() if p.dim() >= 2 and id(p) not in emb | readout}
    assert len(hidden) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block

    def scales(groups):
        out = {}
        for g in groups:
            for p in g["params"]:
                out[id(p)] = g["lr_scale"]
        return out

    for groups in (mup_param_groups(model, 0.1, width_mult), build_optimizer(model, OptimConfig()).param_groups):
        sc = scales(groups)
        assert set(sc) == {id(p) for p in model.parameters()}
        for pid in hidden:
            assert sc[pid] == pytest.approx(8 / C)  # base / width
        for pid in emb | readout:
            assert sc[pid] == 1.0
        for p in model.parameters():
            if p.dim() < 2:
                assert sc[id(p)] == 1.0


# --------------------------------------------------------------------------------------
# bias, tying
# --------------------------------------------------------------------------------------
def test_bias_false_has_no_bias_parameters():
    for kw in ({}, dict(norm="peri", qk_norm=True), dict(norm="res_post", sigma_reparam=True)):
        model = make(bias=False, **kw)
        names = [n for n, _ in model.named_parameters()]
        assert not [n for n in names if "bias" in n], names
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.LayerNorm)):
                assert m.bias is None
    assert any(n.endswith("bias") for n, _ in make(bias=True).named_parameters())


def test_tie_weights_shares_the_embedding():
    model = make(tie_weights=True)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert make().lm_head.weight is not make().transformer.wte.weight


# --------------------------------------------------------------------------------------
# The attention logit tap
# --------------------------------------------------------------------------------------
def test_logit_tap_delivers_explicit_masked_logits_for_first_max_batch():
    model = make(n_layer=1)
    attn = model.transformer.h[0].attn
    attn.logit_tap.max_batch = 2
    seen, xs = [], []

    def hook(mod, inputs, output):
        seen.append((output, inputs[1]))

    attn.logit_tap.register_forward_hook(hook)
    capture(attn, xs, "input")
    idx = tokens(b=5)
    model(idx)  # a training forward (autograd on)
    logits, in_training = seen[0]
    assert in_training is True
    assert logits.shape == (2, H, T, T)
    assert not logits.requires_grad
    with torch.no_grad():
        q, k, _ = qkv(attn, xs[0])
        want = (q[:2] @ k[:2].transpose(-2, -1)) / math.sqrt(C // H)
    upper = torch.ones(T, T, dtype=torch.bool).triu(1)
    assert torch.isneginf(logits[..., upper]).all()
    torch.testing.assert_close(logits[..., ~upper], want[..., ~upper], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        model(idx)
    assert seen[1][1] is False  # evaluation forwards are flagged


def test_logit_tap_hook_does_not_change_the_output():
    model = make()
    idx, targets = tokens(), tokens(seed=2)
    logits0, loss0 = model(idx, targets)
    loss0.backward()
    grads0 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    handles = [b.attn.logit_tap.register_forward_hook(lambda m, i, o: None) for b in model.transformer.h]
    logits1, loss1 = model(idx, targets)
    loss1.backward()
    assert torch.equal(logits0, logits1) and torch.equal(loss0, loss1)
    for g0, p in zip(grads0, model.parameters()):
        assert torch.equal(g0, p.grad)
    for h in handles:
        h.remove()


def test_logit_tap_computes_nothing_without_a_hook(monkeypatch):
    model = make()
    calls = []
    for block in model.transformer.h:
        orig = block.attn._emit_logits
        monkeypatch.setattr(block.attn, "_emit_logits", lambda *a, _o=orig: calls.append(1) or _o(*a))
        monkeypatch.setattr(block.attn.logit_tap, "forward", lambda *a: calls.append("tap") or a[0])
    model(tokens())
    assert calls == []
    h = model.transformer.h[0].attn.logit_tap.register_forward_hook(lambda m, i, o: None)
    model(tokens())
    assert calls == [1, "tap"]
    h.remove()


# --------------------------------------------------------------------------------------
# Bad configs
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(n_embd=30, n_head=4), "model.n_embd"),
        (dict(norm="layer"), "model.norm"),
        (dict(attention="linear"), "model.attention"),
        (dict(output="sparsemax"), "model.output"),
        (dict(parametrization="ntk"), "model.parametrization"),
        (dict(sigma_gamma_init="two"), "model.sigma_gamma_init"),
        (dict(n_layer=0), "model.n_layer"),
        (dict(n_head=2.0), "model.n_head"),
        (dict(dropout=1.0), "model.dropout"),
        (dict(norm_eps=0.0), "model.norm_eps"),
        (dict(bias="yes"), "model.bias"),
        (dict(qk_norm=1), "model.qk_norm"),
    ],
)
def test_bad_config_raises_config_error_naming_the_field(kw, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        make(**kw)


def test_sequence_longer_than_block_size_raises():
    with pytest.raises(ValueError, match="block_size"):
        make()(tokens(t=T + 1))
