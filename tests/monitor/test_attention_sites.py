"""Tests for the attention sites (attention signals of non-TinyGPT models) and their discovery.

Oracle: explicit softmax attention written here - q and k captured from the model's own
projections during the same forward, logits q.k * scale, an explicit "may attend" boolean
matrix, softmax by exp / sum over the allowed keys, entropy -sum p log p. The probe's
``attn/logit_max``, ``attn/entropy`` and ``attn/entropy_min`` must match it.
"""

from __future__ import annotations

import copy
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seismo import Monitor
from seismo.monitor import AttentionProbe, LossProbe, every
from seismo.monitor.attention import ObservedSite
from seismo.monitor.attention_sites import (  # the old path, kept for one release
    HFAttentionSite,
    MHASite,
    SDPASite,
    find_generic_sites,
    is_intercepting,
)

TOL = dict(rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# the oracle
# --------------------------------------------------------------------------


def ref_stats(z: torch.Tensor, allowed: torch.Tensor) -> tuple[float, float, float]:
    """(max |logit|, mean row entropy, min over heads of mean row entropy) of explicit softmax
    attention. ``z``: raw logits (b, h, L, S); ``allowed``: bool, broadcastable, True = may attend.
    Rows without any allowed key are left out."""
    z = z.double()
    allowed = allowed.expand(z.shape)
    row_ok = allowed.any(-1)  # (b, h, L)
    ents = torch.zeros(row_ok.shape, dtype=torch.float64)
    for idx in row_ok.nonzero().tolist():
        b, h, i = idx
        keep = allowed[b, h, i]
        zi = z[b, h, i][keep]
        e = torch.exp(zi - zi.max())
        p = e / e.sum()
        ents[b, h, i] = -(p * torch.log(p)).sum()
    logit_max = z[allowed].abs().max().item()
    mean = ents[row_ok].mean().item()
    per_head = [ents[:, h][row_ok[:, h]].mean().item() for h in range(z.shape[1]) if row_ok[:, h].any()]
    return logit_max, mean, min(per_head)


def check(record: dict, site: str, ref: tuple[float, float, float]) -> None:
    assert record is not None, "nothing recorded"
    got = tuple(float(record[f"attn/{k}/{site}"]) for k in ("logit_max", "entropy", "entropy_min"))
    for g, r, what in zip(got, ref, ("logit_max", "entropy", "entropy_min")):
        assert math.isclose(g, r, rel_tol=TOL["rtol"], abs_tol=TOL["atol"]), f"{site} {what}: probe {g} vs reference {r}"


def causal(L: int, S: int | None = None) -> torch.Tensor:
    return torch.ones(L, L if S is None else S, dtype=torch.bool).tril()


def train_step(model, opt, mon, loss_fn):
    loss = loss_fn()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return mon.step(loss)


# --------------------------------------------------------------------------
# nn.MultiheadAttention
# --------------------------------------------------------------------------


class MHAModel(nn.Module):
    def __init__(self, d=16, nh=4, batch_first=True, kdim=None, vdim=None, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, nh, batch_first=batch_first, kdim=kdim, vdim=vdim, **kw)
        self.head = nn.Linear(d, 3)

    def forward(self, x, mem=None, **kw):
        kv = x if mem is None else mem
        y, _ = self.attn(x, kv, kv, **kw)
        return self.head(y)


def capture_mha(mha: nn.MultiheadAttention, store: list):
    """Test-side capture: q, k projected by hand from the weights at forward time (batch-first)."""

    def hook(mod, args, kwargs):
        q_in, k_in = args[0], args[1]
        if not mod.batch_first:
            q_in, k_in = q_in.transpose(0, 1), k_in.transpose(0, 1)
        E, nh = mod.embed_dim, mod.num_heads
        with torch.no_grad():
            if mod._qkv_same_embed_dim:
                wq, wk = mod.in_proj_weight[:E], mod.in_proj_weight[E : 2 * E]
            else:
                wq, wk = mod.q_proj_weight, mod.k_proj_weight
            bq, bk = mod.in_proj_bias[:E], mod.in_proj_bias[E : 2 * E]
            q = q_in @ wq.T + bq
            k = k_in @ wk.T + bk
            B, L, _ = q.shape
            if mod.bias_k is not None:
                k = torch.cat([k, mod.bias_k.expand(B, 1, E)], 1)
            q = q.reshape(B, L, nh, -1).transpose(1, 2)
            k = k.reshape(B, k.shape[1], nh, -1).transpose(1, 2)
            if mod.add_zero_attn:
                k = torch.cat([k, torch.zeros(B, nh, 1, k.shape[-1])], 2)
            store.append((q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).clone())

    return mha.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_mha_matches_explicit_softmax(batch_first, mask_kind, need_weights):
    torch.manual_seed(0)
    B, L, d = 3, 6, 16
    model = MHAModel(d, 4, batch_first=batch_first)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(B, L, d) * 3
    xin = x if batch_first else x.transpose(0, 1)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[0, 4:] = True  # padded keys of sequence 0
    kpm[1, 5:] = True
    future = torch.ones(L, L, dtype=torch.bool).triu(1)  # True = not allowed
    if mask_kind == "bool":
        kw = dict(key_padding_mask=kpm, attn_mask=future)
    else:  # additive masks
        kw = dict(
            key_padding_mask=torch.zeros(B, L).masked_fill(kpm, float("-inf")),
            attn_mask=torch.zeros(L, L).masked_fill(future, float("-inf")),
        )
    kw["need_weights"] = need_weights

    torch.manual_seed(1)
    out_plain = model(xin, **kw)

    logits = []
    h = capture_mha(model.attn, logits)
    mon = Monitor(model, opt, probes=[AttentionProbe(max_batch=2)], flush_every=1)
    torch.manual_seed(1)
    out = model(xin, **kw)
    assert torch.equal(out, out_plain), "the monitor changed the output"
    loss = out.pow(2).mean()
    loss.backward()
    opt.step()
    rec = mon.step(loss)
    mon.close()
    h.remove()

    allowed = (~future)[None, None] & (~kpm[:2])[:, None, None, :]
    check(rec, "attn", ref_stats(logits[0][:2], allowed))


@pytest.mark.parametrize("extras", [dict(kdim=10, vdim=7), dict(add_bias_kv=True, add_zero_attn=True)])
def test_mha_cross_attention_separate_projections(extras):
    torch.manual_seed(2)
    B, L, S, d = 2, 5, 7, 16
    model = MHAModel(d, 2, batch_first=True, **extras)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(B, L, d)
    kdim = extras.get("kdim", d)
    if "kdim" in extras:
        # separate k/v inputs of different widths
        model.forward = lambda x, mem, **kw: model.head(model.attn(x, mem[0], mem[1], **kw)[0])
        mem = (torch.randn(B, S, kdim), torch.randn(B, S, extras["vdim"]))
    else:
        mem = torch.randn(B, S, d)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, 3:] = True
    logits = []
    h = capture_mha(model.attn, logits)
    mon = Monitor(model, opt, probes=[AttentionProbe()])
    rec = train_step(model, opt, mon, lambda: model(x, mem, key_padding_mask=kpm).pow(2).mean())
    mon.close()
    h.remove()
    extra = logits[0].shape[-1] - S
    allowed = torch.cat([~kpm, torch.ones(B, extra, dtype=torch.bool)], 1)[:, None, None, :]
    check(rec, "attn", ref_stats(logits[0], allowed))


def test_transformer_encoder_names_and_values():
    torch.manual_seed(3)
    B, L, d = 2, 6, 16
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 4, 32, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False)
    sites = find_generic_sites(enc)
    assert [s.name for s in sites] == ["layers.0.self_attn", "layers.1.self_attn"]
    assert all(isinstance(s, MHASite) for s in sites)
    opt = torch.optim.SGD(enc.parameters(), lr=0.1)
    x = torch.randn(B, L, d)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1, 4:] = True
    mask = nn.Transformer.generate_square_subsequent_mask(L)
    kpm_f = torch.zeros(B, L).masked_fill(kpm, float("-inf"))
    out_plain = enc(x, mask=mask, src_key_padding_mask=kpm_f, is_causal=True)
    logits0, logits1 = [], []
    h0 = capture_mha(enc.layers[0].self_attn, logits0)
    h1 = capture_mha(enc.layers[1].self_attn, logits1)
    mon = Monitor(enc, opt, probes=[AttentionProbe()])
    out = enc(x, mask=mask, src_key_padding_mask=kpm_f, is_causal=True)
    assert torch.equal(out, out_plain)
    loss = out.pow(2).mean()
    loss.backward()
    opt.step()
    rec = mon.step(loss)
    mon.close()
    h0.remove()
    h1.remove()
    allowed = causal(L)[None, None] & (~kpm)[:, None, None, :]
    check(rec, "layers.0.self_attn", ref_stats(logits0[0], allowed))
    check(rec, "layers.1.self_attn", ref_stats(logits1[0], allowed))


# --------------------------------------------------------------------------
# modules calling F.scaled_dot_product_attention
# --------------------------------------------------------------------------


class SelfAttn(nn.Module):
    """A user's attention: calls F.scaled_dot_product_attention."""

    def __init__(self, d=16, nh=4, nkv=None, scale=None):
        super().__init__()
        self.nh, self.nkv = nh, nkv or nh
        self.hd = d // nh
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * self.nkv * self.hd)
        self.o = nn.Linear(d, d)
        self.scale = scale

    def forward(self, x, mem=None, mask=None, is_causal=False):
        B, L, _ = x.shape
        src = x if mem is None else mem
        q = self.q(x).view(B, L, self.nh, self.hd).transpose(1, 2)
        k, v = self.kv(src).view(B, src.shape[1], 2, self.nkv, self.hd).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale, enable_gqa=self.nkv != self.nh
        )
        return self.o(y.transpose(1, 2).reshape(B, L, -1))


class Net(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.blocks = nn.ModuleList([SelfAttn(**kw), SelfAttn(**kw)])

    def forward(self, x, **kw):
        for b in self.blocks:
            x = x + b(x, **kw)
        return x


def capture_sdpa_module(mod: SelfAttn, store: list, mem=None):
    """Test-side capture of q and k of a SelfAttn from its own projections."""
    state = {}

    def q_hook(m, inp, out):
        state["q"] = out.detach().clone()

    def kv_hook(m, inp, out):
        B, S, _ = out.shape
        k = out.detach().view(B, S, 2, mod.nkv, mod.hd)[:, :, 0].transpose(1, 2)
        q = state["q"]
        q = q.view(q.shape[0], q.shape[1], mod.nh, mod.hd).transpose(1, 2)
        k = k.repeat_interleave(mod.nh // mod.nkv, dim=1)  # explicit GQA: key head h // groups
        scale = mod.scale if mod.scale is not None else 1 / math.sqrt(mod.hd)
        store.append(q @ k.transpose(-2, -1) * scale)

    return [mod.q.register_forward_hook(q_hook), mod.kv.register_forward_hook(kv_hook)]


@pytest.mark.parametrize(
    "case",
    ["causal", "bool_mask", "gqa_causal", "float_mask_scale", "cross_causal_topleft"],
)
def test_sdpa_module_matches_explicit_softmax(case):
    torch.manual_seed(4)
    B, L, d = 3, 7, 16
    kw = dict(nkv=2) if case.startswith("gqa") else {}
    if case == "float_mask_scale":
        kw["scale"] = 0.37
    net = Net(d=d, **kw)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    x = torch.randn(B, L, d) * 2
    g = torch.Generator().manual_seed(0)
    fwd_kw: dict = {}
    if case in ("causal", "gqa_causal"):
        fwd_kw = dict(is_causal=True)
        allowed = causal(L)[None, None]
    elif case == "bool_mask":
        m = torch.rand(B, 1, L, L, generator=g) > 0.4
        m[..., 0] = True  # every row attends somewhere
        fwd_kw = dict(mask=m)
        allowed = m[:2]
    elif case == "float_mask_scale":
        bias = torch.randn(1, 4, L, L, generator=g)
        blocked = torch.rand(1, 1, L, L, generator=g) > 0.7
        blocked[..., 0] = False
        m = bias.masked_fill(blocked, float("-inf"))
        fwd_kw = dict(mask=m)
        allowed = ~blocked
    if case == "cross_causal_topleft":
        # one attention module, Tq=4 < Tk=6, is_causal: torch aligns the mask top-left
        model = SelfAttn(d=d)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        xq, mem = x[:, :4], torch.randn(B, 6, d)
        store = []
        hs = capture_sdpa_module(model, store)
        plain = model(xq, mem=mem, is_causal=True)
        mon = Monitor(model, opt, probes=[AttentionProbe(max_batch=2)])
        out = model(xq, mem=mem, is_causal=True)
        assert torch.equal(out, plain)
        loss = out.pow(2).mean()
        loss.backward()
        opt.step()
        rec = mon.step(loss)
        mon.close()
        for h in hs:
            h.remove()
        check(rec, "<root>", ref_stats(store[0][:2], causal(4, 6)[None, None]))
        return

    stores = [[], []]
    hs = capture_sdpa_module(net.blocks[0], stores[0]) + capture_sdpa_module(net.blocks[1], stores[1])
    plain = net(x, **fwd_kw)
    mon = Monitor(net, opt, probes=[AttentionProbe(max_batch=2)])
    assert mon.probes[0].sites == []  # found by watching the first forward
    out = net(x, **fwd_kw)
    assert torch.equal(out, plain), "the monitor changed the output"
    loss = out.pow(2).mean()
    loss.backward()
    opt.step()
    rec = mon.step(loss)
    assert [s.name for s in mon.probes[0].sites] == ["blocks.0", "blocks.1"]  # found when the step is collected
    assert all(isinstance(s, ObservedSite) and s.kinds == {"sdpa"} for s in mon.probes[0].sites)
    mon.close()
    for h in hs:
        h.remove()
    for i in range(2):
        z = stores[i][0][:2]
        if case == "float_mask_scale":
            z = z + bias.masked_fill(blocked, 0.0)  # the additive bias is part of the logits
        check(rec, f"blocks.{i}", ref_stats(z, allowed))


# --------------------------------------------------------------------------
# Hugging Face transformers
# --------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def tiny_gpt2(impl: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(5)
    cfg = GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=50, n_positions=32, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg)
    model.set_attn_implementation(impl)
    with torch.no_grad():  # larger logits than the 0.02-std init, so entropies differ per head
        for blk in model.transformer.h:
            blk.attn.c_attn.weight.mul_(8)
    return model


def capture_gpt2(model, stores):
    hs = []
    for blk, store in zip(model.transformer.h, stores):
        attn = blk.attn

        def hook(m, inp, out, attn=attn, store=store):
            q, k, _ = out.detach().split(attn.split_size, dim=2)
            B, T, _ = q.shape
            q = q.view(B, T, attn.num_heads, attn.head_dim).transpose(1, 2)
            k = k.view(B, T, attn.num_heads, attn.head_dim).transpose(1, 2)
            store.append((q @ k.transpose(-2, -1)) / math.sqrt(attn.head_dim))

        hs.append(attn.c_attn.register_forward_hook(hook))
    return hs


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("padded", [False, True])
def test_hf_gpt2_matches_explicit_softmax(impl, padded):
    model = tiny_gpt2(impl)
    model.train()
    sites = find_generic_sites(model)
    assert [s.name for s in sites] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert all(isinstance(s, HFAttentionSite) for s in sites)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    B, T = 3, 10
    ids = torch.randint(0, 50, (B, T), generator=torch.Generator().manual_seed(1))
    am = torch.ones(B, T, dtype=torch.long)
    if padded:
        am[0, 6:] = 0  # right padding
        am[2, 8:] = 0
    kw = dict(attention_mask=am) if padded else {}
    plain = model(ids, **kw).logits
    stores = [[], []]
    hs = capture_gpt2(model, stores)
    mon = Monitor(model, opt, probes=[AttentionProbe(max_batch=2)])
    out = model(ids, labels=ids, **kw)
    assert torch.equal(out.logits, plain), "the monitor changed the output"
    out.loss.backward()
    opt.step()
    opt.zero_grad()
    recs = [mon.step(out.loss)]
    recs.append(train_step(model, opt, mon, lambda: model(ids, labels=ids, **kw).loss))
    mon.close()
    for h in hs:
        h.remove()
    allowed = causal(T)[None, None] & am[:2, None, None, :].bool()
    for step, rec in enumerate(recs):
        for i in range(2):
            check(rec, f"transformer.h.{i}.attn", ref_stats(stores[i][step][:2], allowed))
    # the heads differ, so entropy_min is really a minimum over heads
    assert float(recs[0]["attn/entropy_min/transformer.h.0.attn"]) < float(recs[0]["attn/entropy/transformer.h.0.attn"]) - 1e-3


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


@pytest.mark.parametrize("impl,padded", [("sdpa", False), ("sdpa", True), ("eager", True)])
def test_hf_llama_gqa_matches_explicit_softmax(impl, padded):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(6)
    cfg = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, use_cache=False, bos_token_id=0, eos_token_id=0,
    )
    model = LlamaForCausalLM(cfg)
    model.set_attn_implementation(impl)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stores = [[], []]
    hs = []
    for layer, store in zip(model.model.layers, stores):
        att = layer.self_attn

        def hook(m, args, kwargs, store=store):
            h = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            B, T, _ = h.shape
            hd, nh, nkv = m.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
            with torch.no_grad():
                q = (h @ m.q_proj.weight.T).view(B, T, nh, hd).transpose(1, 2)
                k = (h @ m.k_proj.weight.T).view(B, T, nkv, hd).transpose(1, 2)
                c, s = cos.unsqueeze(1), sin.unsqueeze(1)
                q = q * c + rotate_half(q) * s
                k = k * c + rotate_half(k) * s
                k = k.repeat_interleave(nh // nkv, dim=1)  # query head h uses key head h // 2
                store.append(q @ k.transpose(-2, -1) / math.sqrt(hd))

        hs.append(att.register_forward_pre_hook(hook, with_kwargs=True))
    B, T = 3, 9
    ids = torch.randint(0, 50, (B, T), generator=torch.Generator().manual_seed(2))
    am = torch.ones(B, T, dtype=torch.long)
    if padded:
        am[1, 5:] = 0
    kw = dict(attention_mask=am) if padded else {}
    mon = Monitor(model, opt, probes=[AttentionProbe(max_batch=2)])
    rec = train_step(model, opt, mon, lambda: model(ids, labels=ids, **kw).loss)
    mon.close()
    for h in hs:
        h.remove()
    allowed = causal(T)[None, None] & am[:2, None, None, :].bool()
    for i in range(2):
        check(rec, f"model.layers.{i}.self_attn", ref_stats(stores[i][0][:2], allowed))


# --------------------------------------------------------------------------
# patch lifetime, schedules, eval passes, failures
# --------------------------------------------------------------------------


def attn_probe(mon):
    return next(p for p in mon.probes if isinstance(p, AttentionProbe))


def test_observed_on_tracked_steps_only_and_nothing_patched():
    original, softmax = F.scaled_dot_product_attention, F.softmax
    torch.manual_seed(7)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    seen = []
    h = net.blocks[0].q.register_forward_hook(lambda m, a, o: seen.append(is_intercepting()))
    x = torch.randn(2, 5, 16)
    mon = Monitor(net, opt, probes=[LossProbe(), AttentionProbe(schedule=every(2))])
    recs = []
    for _ in range(4):
        recs.append(train_step(net, opt, mon, lambda: net(x, is_causal=True).pow(2).mean()))
        assert not is_intercepting()  # the mode lives inside site forwards only
    assert seen == [True, False, True, False]  # observed during tracked forwards only (step 0: discovery)
    assert [any(k.startswith("attn/") for k in r) for r in recs] == [True, False, True, False]
    mon.close()
    h.remove()
    assert F.scaled_dot_product_attention is original and F.softmax is softmax  # never patched
    assert not net.blocks[0]._forward_hooks and not net.blocks[0]._forward_pre_hooks and not net._forward_hooks


@pytest.mark.filterwarnings("ignore:seismo. probe")
def test_monitor_every_close_mid_window_leaves_nothing():
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    mon = Monitor(net, opt, probes="default", every=3)
    assert net._forward_pre_hooks  # step 0 is armed: discovery waits for the forward
    mon.close()  # closed while armed
    assert not is_intercepting()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_restored_after_forward_raises():
    class Boom(SelfAttn):
        def forward(self, x, **kw):
            y = super().forward(x, **kw)
            if getattr(self, "explode", False):
                raise RuntimeError("user error")  # after its SDPA call was observed
            return y

    net = nn.Sequential(Boom(), Boom())
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.randn(2, 5, 16)
    mon = Monitor(net, opt, probes=[AttentionProbe()])
    net[0].explode = True
    with pytest.raises(RuntimeError, match="user error"):
        net(x)  # a forward of the discovery step raises: the step's later forwards are watched too
    assert not is_intercepting()
    net[0].explode = False
    rec = train_step(net, opt, mon, lambda: net(x).pow(2).mean())
    assert {"attn/entropy/0", "attn/entropy/1"} <= set(rec)
    net[1].explode = True
    with pytest.raises(RuntimeError, match="user error"):
        net(x)  # a site forward raises on a tracked step
    assert attn_probe(mon).gate.stack == [] and not is_intercepting()  # the always_call hooks left the mode
    net[1].explode = False
    mon.close()


def test_eval_forwards_under_no_grad_not_recorded():
    torch.manual_seed(8)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x_train, x_eval = torch.randn(2, 5, 16), torch.randn(2, 5, 16) * 10
    stores = [[], []]
    hs = capture_sdpa_module(net.blocks[0], stores[0])
    mon = Monitor(net, opt, probes=[AttentionProbe()])
    with torch.no_grad():  # evaluation inside the armed window, before the training forward
        net(x_eval, is_causal=True)
    with torch.inference_mode():
        net(x_eval, is_causal=True)
    rec = train_step(net, opt, mon, lambda: net(x_train, is_causal=True).pow(2).mean())
    check(rec, "blocks.0", ref_stats(stores[0][2], causal(5)[None, None]))  # the training forward
    # a step whose only forward is an evaluation records no attention
    with torch.no_grad():
        net(x_eval, is_causal=True)
    rec2 = mon.step(torch.tensor(1.0))
    assert rec2 is None or not any(k.startswith("attn/") for k in rec2)
    mon.close()
    for h in hs:
        h.remove()


@pytest.mark.parametrize("kind", ["mha", "hf_eager"])
def test_eval_not_recorded_mha_and_hf(kind):
    if kind == "mha":
        model = MHAModel()
        x_eval, x_train = torch.randn(2, 5, 16) * 10, torch.randn(2, 5, 16)
        fwd = lambda x: model(x)
        logits = []
        hs = [capture_mha(model.attn, logits)]
        site = "attn"
    else:
        model = tiny_gpt2("eager")
        x_eval, x_train = torch.randint(0, 50, (2, 6)), torch.randint(0, 50, (2, 6))
        fwd = lambda x: model(x).logits
        logits = [[], []]
        hs = capture_gpt2(model, logits)
        site = "transformer.h.0.attn"
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = Monitor(model, opt, probes=[AttentionProbe()])
    with torch.no_grad():
        fwd(x_eval)
    rec = train_step(model, opt, mon, lambda: fwd(x_train).float().pow(2).mean())
    mon.close()
    for h in hs:
        h.remove()
    z = logits[1] if kind == "mha" else logits[0][1]
    allowed = torch.ones(1, 1, 1, 1, dtype=torch.bool) if kind == "mha" else causal(6)[None, None]
    check(rec, site, ref_stats(z, allowed))


def test_no_attention_model_disables_probe_with_warning():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, opt, probes=[LossProbe(), AttentionProbe()])
    x = torch.randn(5, 4)
    with pytest.warns(RuntimeWarning, match=r"probe 'attn' is off: .*found no attention in the forwards of the first tracked step"):
        rec = train_step(model, opt, mon, lambda: model(x).pow(2).mean())  # discovery watches the first tracked step
    assert "attn" in mon.disabled and "loss" in rec and not any(k.startswith("attn/") for k in rec)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    for _ in range(3):
        rec = train_step(model, opt, mon, lambda: model(x).pow(2).mean())
        assert "loss" in rec and not any(k.startswith("attn/") for k in rec)
    mon.close()


def test_unobservable_hf_implementation_warns_and_falls_back_gracefully():
    model = tiny_gpt2("sdpa")
    site = find_generic_sites(model)[0]
    model.config._attn_implementation = "flex_attention"  # pretend: a fused kernel we cannot see
    with pytest.warns(RuntimeWarning, match="cannot observe"):
        handle = site.install(lambda z: None, 2)
    handle.remove()
    handle.remove()  # idempotent
    model.config._attn_implementation = "sdpa"
    assert not is_intercepting("sdpa") and not is_intercepting("softmax")


def test_site_failure_never_reaches_the_forward(monkeypatch):
    import seismo.monitor.attention.interception as interception

    def broken(*a, **k):
        raise ValueError("cannot")

    monkeypatch.setattr(interception, "sdpa_logits", broken)
    torch.manual_seed(9)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.randn(2, 5, 16)
    plain = net(x)
    mon = Monitor(net, opt, probes=[LossProbe(), AttentionProbe()])
    with pytest.warns(RuntimeWarning, match="cannot compute attention logits"):
        out = net(x)
    assert torch.equal(out, plain)
    loss = out.pow(2).mean()
    loss.backward()
    rec = mon.step(loss)
    assert "loss" in rec and not any(k.startswith("attn/") for k in rec)
    mon.close()


def test_sdpa_site_three_dim_inputs():
    class Flat(nn.Module):  # (B, L, E) query without a head dimension
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            h = self.lin(x)
            return F.scaled_dot_product_attention(h, h, h, is_causal=True)

    torch.manual_seed(10)
    mod = Flat()
    got = []
    (site,) = find_generic_sites(mod)
    handle = site.install(got.append, 2)
    x = torch.randn(3, 5, 8)
    out = mod(x)
    handle.remove()
    h = mod.lin(x).detach()
    z = (h @ h.transpose(-2, -1) / math.sqrt(8))[:2, None]
    assert out.shape == (3, 5, 8) and len(got) == 1
    ref = z.masked_fill(~causal(5), float("-inf"))
    torch.testing.assert_close(got[0], ref, **TOL)


def test_other_thread_calls_pass_through():
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    mon = Monitor(net, opt, probes=[AttentionProbe()])
    results = []

    def worker():  # plain SDPA from another thread, not inside a site module: untouched
        q = torch.randn(1, 2, 3, 4, requires_grad=True)
        results.append(F.scaled_dot_product_attention(q, q, q).shape)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert results == [torch.Size([1, 2, 3, 4])]
    rec = train_step(net, opt, mon, lambda: net(torch.randn(2, 5, 16)).pow(2).mean())
    assert "attn/entropy/blocks.1" in rec
    mon.close()


@pytest.mark.filterwarnings("ignore:seismo. probe")
def test_default_preset_finds_generic_sites():
    model = MHAModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = Monitor(model, opt)  # probes="default"
    rec = train_step(model, opt, mon, lambda: model(torch.randn(2, 4, 16)).pow(2).mean())
    assert {"attn/logit_max/attn", "attn/entropy/attn", "attn/entropy_min/attn"} <= set(rec)
    assert "attn" not in mon.disabled
    mon.close()


def test_mha_inside_sdpa_module_is_not_misattributed():
    """An nn.MultiheadAttention (need_weights=False calls SDPA internally) nested in a module that
    calls SDPA itself: the outer site reports its own SDPA call, the MHA site its own logits."""

    class Mixer(SelfAttn):
        def __init__(self):
            super().__init__()
            self.inner = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            x = x + self.inner(x, x, x, need_weights=False)[0]  # runs first
            return super().forward(x, is_causal=True)

    torch.manual_seed(11)
    model = Mixer()
    sites = {s.name: type(s) for s in find_generic_sites(model)}
    assert sites == {"<root>": SDPASite, "inner": MHASite}
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    outer, inner = [], []
    hs = capture_sdpa_module(model, outer) + [capture_mha(model.inner, inner)]
    mon = Monitor(model, opt, probes=[AttentionProbe()])
    rec = train_step(model, opt, mon, lambda: model(torch.randn(2, 5, 16) * 3).pow(2).mean())
    mon.close()
    for h in hs:
        h.remove()
    check(rec, "<root>", ref_stats(outer[0], causal(5)[None, None]))
    check(rec, "inner", ref_stats(inner[0], torch.ones(1, 1, 1, 1, dtype=torch.bool)))


# --------------------------------------------------------------------------
# discovery by observation: no source text needed, any binding of the functions
# --------------------------------------------------------------------------

NOTEBOOK_CELL = '''
import math
import torch
import torch.nn as nn
from torch.nn.functional import scaled_dot_product_attention as sdpa   # bound at import time


class NotebookAttn(nn.Module):
    """Defined in a notebook cell: inspect cannot find its source."""

    def __init__(self, d=16, nh=4, how="sdpa"):
        super().__init__()
        self.nh, self.hd, self.how = nh, d // nh, how
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.nh, self.hd).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        self.seen = (q.detach().clone(), k.detach().clone())  # for the test's oracle
        if self.how == "sdpa":
            y = sdpa(q, k, v, is_causal=True)
        else:
            z = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd)
            z = z.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            a = torch.softmax(z, dim=-1) if self.how == "torch.softmax" else z.softmax(-1)
            y = a @ v
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class NotebookNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(NotebookAttn(how=h) for h in ("sdpa", "torch.softmax", "Tensor.softmax"))
        self.router = nn.Linear(16, 4)

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        gate = torch.softmax(self.router(x), dim=-1)  # a 3-D softmax: not attention
        return x * gate.sum(-1, keepdim=True)
'''


@pytest.fixture
def notebook_classes(monkeypatch):
    """The cell exec'd in a fake ``__main__`` without a file (a notebook, ``python -``)."""
    import inspect
    import sys
    import types

    fake_main = types.ModuleType("__main__")
    monkeypatch.setitem(sys.modules, "__main__", fake_main)
    ns = fake_main.__dict__
    exec(compile(NOTEBOOK_CELL, "<ipython-input-1-cell>", "exec"), ns)
    with pytest.raises((OSError, TypeError)):
        inspect.getsource(ns["NotebookAttn"])  # what broke the source-text discovery
    return ns


def test_attention_defined_in_a_notebook_is_observed(notebook_classes):
    torch.manual_seed(12)
    net = notebook_classes["NotebookNet"]()
    assert find_generic_sites(net) == []  # reading source finds nothing here
    reference = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    mon = Monitor(net, opt, probes=[AttentionProbe(max_batch=2, schedule=every(2))])
    for step in range(4):
        x = torch.randn(3, 6, 16)
        out, plain = net(x), reference(x)
        assert torch.equal(out, plain), f"step {step}: the monitor changed the output"
        ref_loss = plain.pow(2).mean()
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        rec = train_step(net, opt, mon, lambda out=out: out.pow(2).mean())
        if step % 2:
            assert rec is None
            continue
        probe = attn_probe(mon)
        assert [(s.name, set(s.kinds)) for s in probe.sites] == [
            ("blocks.0", {"sdpa"}), ("blocks.1", {"softmax"}), ("blocks.2", {"softmax"}),
        ]  # the router's 3-D softmax is not attention
        for i, blk in enumerate(net.blocks):
            q, k = blk.seen
            z = (q @ k.transpose(-2, -1))[:2] / math.sqrt(blk.hd)
            check(rec, f"blocks.{i}", ref_stats(z, causal(6)[None, None]))
    mon.close()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_observation_sees_every_binding_and_only_the_innermost_module():
    """sdpa bound under another name, torch.softmax and Tensor.softmax, in modules nested in a
    module that also calls softmax: each call goes to the module executing it."""

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.ModuleList([SelfAttn(), SelfAttn()])

        def forward(self, x):
            for m in self.inner:
                x = x + m(x, is_causal=True)
            z = torch.einsum("bqd,bkd->bk", x, x)[:, None, None, :] / 4  # (B, 1, 1, S) scores of its own
            self.z = z.detach().clone()
            return x * z.softmax(-1).sum()

    torch.manual_seed(13)
    model = Outer()
    stores = [[], []]
    hs = capture_sdpa_module(model.inner[0], stores[0]) + capture_sdpa_module(model.inner[1], stores[1])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = Monitor(model, opt, probes=[AttentionProbe(max_batch=4)])
    rec = train_step(model, opt, mon, lambda: model(torch.randn(2, 5, 16)).pow(2).mean())
    assert sorted(s.name for s in attn_probe(mon).sites) == ["<root>", "inner.0", "inner.1"]
    for i in range(2):
        check(rec, f"inner.{i}", ref_stats(stores[i][0], causal(5)[None, None]))
    check(rec, "<root>", ref_stats(model.z, torch.ones(1, 1, 1, 1, dtype=torch.bool)))
    # a tracked step after discovery reads the same calls through the sites' own modes
    rec = train_step(model, opt, mon, lambda: model(torch.randn(2, 5, 16)).pow(2).mean())
    for i in range(2):
        check(rec, f"inner.{i}", ref_stats(stores[i][1], causal(5)[None, None]))
    check(rec, "<root>", ref_stats(model.z, torch.ones(1, 1, 1, 1, dtype=torch.bool)))
    mon.close()
    for h in hs:
        h.remove()
