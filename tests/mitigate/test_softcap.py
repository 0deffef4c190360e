"""Logit soft-capping (Gemma 2, arXiv 2408.00118): the formula, TinyGPT's switches and the model edits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seismo.errors import ConfigError
from seismo.mitigate.softcap import apply_attn_softcap, apply_final_softcap, softcap
from seismo.monitor.attention import find_attention_sites
from seismo.proxy.model import GPTConfig, TinyGPT

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_softcap_formula_against_math_tanh():
    xs = [-1e4, -300.0, -30.0, -1.0, 0.0, 0.5, 29.0, 1e6]
    got = softcap(torch.tensor(xs, dtype=torch.float64), 30.0)
    for x, y in zip(xs, got.tolist()):
        assert y == pytest.approx(30.0 * math.tanh(x / 30.0), rel=1e-12, abs=1e-12)
        assert abs(y) <= 30.0
    x = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)  # slope 1 - tanh^2(x / cap)
    softcap(x, 2.0).sum().backward()
    assert float(x.grad) == pytest.approx(1 - math.tanh(0.15) ** 2, rel=1e-12)


def reference_attention(attn, x, cap):
    """Gemma 2's attention with soft-capping, written out from the paper for one TinyGPT attention."""
    B, T, C = x.shape
    nh = attn.n_head
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(B, T, nh, -1).transpose(1, 2) for t in (q, k, v))
    s = q @ k.transpose(-1, -2) / math.sqrt(C // nh)
    s = cap * torch.tanh(s / cap)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, T, C)
    return attn.c_proj(y), s


def test_tinygpt_attn_softcap_matches_the_formula_and_the_tap_sees_capped_logits():
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=4, n_embd=32, attn_softcap=5.0))
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        attn.c_attn.weight[:64] *= 30.0  # q and k rows: logits far over the cap
    x = torch.randn(2, 16, 32)
    seen = []
    find_attention_sites(model)[0].install(seen.append, 8)
    want, s = reference_attention(attn, x, 5.0)
    s = s.detach()
    torch.testing.assert_close(attn(x), want)
    assert float(s[torch.isfinite(s)].abs().max()) > 4.9  # the cap is reached...
    torch.testing.assert_close(seen[0], s)  # ...and the monitor reads what the softmax sees
    plain = TinyGPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=4, n_embd=32))
    plain.load_state_dict(model.state_dict())
    assert not torch.allclose(plain.transformer.h[0].attn(x), want, atol=1e-3)  # the cap changed the output


def test_tinygpt_final_softcap_bounds_the_logits_and_the_loss_uses_them():
    torch.manual_seed(0)
    cfg = dict(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16)
    capped, plain = TinyGPT(GPTConfig(**cfg, final_softcap=3.0)), TinyGPT(GPTConfig(**cfg))
    plain.load_state_dict(capped.state_dict())
    with torch.no_grad():
        for m in (capped, plain):
            m.lm_head.weight.mul_(500.0)
    idx = torch.randint(0, 32, (2, 8))
    with torch.no_grad():
        (lc, loss_c), (lp, _) = capped(idx, idx), plain(idx, idx)
    torch.testing.assert_close(lc, 3.0 * torch.tanh(lp / 3.0))
    assert float(lp.abs().max()) > 3.0 >= float(lc.abs().max())
    torch.testing.assert_close(loss_c, F.cross_entropy(lc.view(-1, 32), idx.view(-1)))


def test_model_edits_match_the_switches():
    torch.manual_seed(0)
    cfg = dict(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16)
    switched = TinyGPT(GPTConfig(**cfg, attn_softcap=2.0, final_softcap=1.5))
    edited = TinyGPT(GPTConfig(**cfg))
    edited.load_state_dict(switched.state_dict())
    assert apply_attn_softcap(edited, 2.0) == 2
    handle = apply_final_softcap(edited, 1.5)
    idx = torch.randint(0, 32, (3, 8))
    torch.testing.assert_close(edited(idx)[0], switched(idx)[0])
    handle.remove()
    assert float(edited(idx)[0].abs().max()) > 0  # removable
    hf_like = nn.Module()
    hf_like.config = type("Cfg", (), {"attn_logit_softcapping": None})()
    assert apply_attn_softcap(hf_like, 50.0) == 1 and hf_like.config.attn_logit_softcapping == 50.0


def test_bad_caps_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match="model.attn_softcap"):
        TinyGPT(GPTConfig(attn_softcap=0.0))
    with pytest.raises(ConfigError, match="model.final_softcap"):
        TinyGPT(GPTConfig(final_softcap=True))
    with pytest.raises(ConfigError, match="attn_softcap"):
        apply_attn_softcap(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="no module 'head'"):
        apply_final_softcap(nn.Linear(2, 2), head="head")
    with pytest.raises(ConfigError, match="final_softcap"):
        apply_final_softcap(TinyGPT(GPTConfig(n_layer=1)), cap=-1)
