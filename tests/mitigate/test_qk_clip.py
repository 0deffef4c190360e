"""QK-Clip (Kimi K2, arXiv 2507.20534) against the paper's formula, recomputing the logits by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from seismo.errors import ConfigError
from seismo.mitigate.qk_clip import AttentionHeads, QKClip, find_qk_heads, head_max_logits
from seismo.monitor.attention import Gate, find_attention_sites
from seismo.proxy.model import GPTConfig, TinyGPT

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TAU = 100.0


def hand_logits_tinygpt(model: TinyGPT, idx: torch.Tensor, inputs: list | None = None) -> dict[str, torch.Tensor]:
    """Per-head max pre-softmax logit of every block, recomputed from the weights (independent of the tap).

    ``inputs``: a list to fill with each block's input, or (when filled) the block inputs to use instead
    of the model's own (so that a block's logits are compared on the same input before and after clipping)."""
    cfg = model.config
    out = {}
    fixed = bool(inputs)
    with torch.no_grad():
        x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(idx.size(1)))
        for i, block in enumerate(model.transformer.h):
            if fixed:
                x = inputs[i]
            elif inputs is not None:
                inputs.append(x)
            a = block.attn
            h = block.ln_1(x)
            W, b = a.c_attn.weight.double(), a.c_attn.bias.double()
            qkv = h.double() @ W.T + b
            q, k, _ = qkv.split(cfg.n_embd, dim=2)
            B, T, C = q.shape
            q = q.view(B, T, cfg.n_head, -1).transpose(1, 2)
            k = k.view(B, T, cfg.n_head, -1).transpose(1, 2)
            s = (q @ k.transpose(-1, -2)) / math.sqrt(cfg.head_dim)
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            out[f"transformer.h.{i}.attn"] = s.amax(dim=(0, 2, 3))
            x = block(x)
    return out


def hot_tinygpt(seed=0) -> TinyGPT:
    torch.manual_seed(seed)
    model = TinyGPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=4, n_embd=32))
    with torch.no_grad():  # heads 0 and 2 of each block get logits far over tau, heads 1 and 3 stay small
        for block in model.transformer.h:
            W = block.attn.c_attn.weight
            for hd in (0, 2):
                W[hd * 8:(hd + 1) * 8] *= 150.0          # q rows of head hd
                W[32 + hd * 8:32 + (hd + 1) * 8] *= 150.0  # k rows of head hd
    return model


def test_tinygpt_clip_brings_every_head_to_tau_and_leaves_the_others_bitwise():
    model = hot_tinygpt()
    idx = torch.randint(0, 32, (3, 16), generator=torch.Generator().manual_seed(1))
    block_inputs = []
    before = hand_logits_tinygpt(model, idx, block_inputs)
    assert all(float(s[0]) > 5 * TAU and float(s[1]) < TAU for s in before.values())
    weights = {n: (m.c_attn.weight.clone(), m.c_attn.bias.clone()) for n, m in model.named_modules() if hasattr(m, "c_attn")}
    qk = QKClip(model, tau=TAU)
    assert qk.attach(find_attention_sites(model)) == 2
    model(idx)  # the training forward: the tap hands its logits to QKClip
    for name, s in qk.max_logits.items():
        torch.testing.assert_close(s.double(), before[name], rtol=1e-4, atol=1e-3)
    qk.clip()
    after = hand_logits_tinygpt(model, idx, block_inputs)  # each block on the input it had when observed
    for name, s in after.items():
        assert float(s.max()) <= TAU * (1 + 1e-5)
        for hd in (0, 2):  # clipped heads land on tau: the logit scales by exactly tau / S
            assert float(s[hd]) == pytest.approx(TAU, rel=1e-5)
        W0, b0 = weights[name]
        mod = model.get_submodule(name)
        for hd in (1, 3):  # heads under tau: q, k and v rows bitwise unchanged
            for off in (0, 32, 64):
                rows = slice(off + hd * 8, off + (hd + 1) * 8)
                assert torch.equal(mod.c_attn.weight[rows], W0[rows]) and torch.equal(mod.c_attn.bias[rows], b0[rows])
        for hd in (0, 2):  # the paper's formula: W_q^h and W_k^h times sqrt(tau / S_h)
            g = math.sqrt(TAU / float(before[name][hd]))
            for off in (0, 32):
                rows = slice(off + hd * 8, off + (hd + 1) * 8)
                torch.testing.assert_close(mod.c_attn.weight[rows], W0[rows] * g)
        assert torch.equal(mod.c_attn.weight[64:], W0[64:])  # v untouched
    assert qk.max_logits == {}  # observations are consumed by clip()


def test_under_tau_nothing_changes_and_no_observation_is_a_no_op():
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=4, n_embd=32))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    qk = QKClip(model, tau=TAU)
    qk.attach(find_attention_sites(model))
    model(torch.randint(0, 32, (2, 16)))
    scales = qk.clip()
    assert torch.equal(scales["transformer.h.0.attn"], torch.ones(4))
    qk.clip()  # nothing observed since: nothing to do
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_micro_batches_combine_by_max_and_eval_forwards_are_ignored():
    model = hot_tinygpt()
    qk = QKClip(model, tau=TAU)
    qk.attach(find_attention_sites(model))
    a, b = (torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    model(a)
    model(b)
    with torch.no_grad():
        model(torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(3)))
    ha, hb = hand_logits_tinygpt(model, a), hand_logits_tinygpt(model, b)
    for name, s in qk.max_logits.items():
        torch.testing.assert_close(s.double(), torch.maximum(ha[name], hb[name]), rtol=1e-4, atol=1e-3)


class GQAAttention(nn.Module):
    """Llama-style attention (q_proj, k_proj, num_heads, num_key_value_heads) computing its logits by hand."""

    def __init__(self, d=24, nh=4, nkv=2):
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = nh, nkv, d // nh
        self.q_proj = nn.Linear(d, nh * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, nkv * self.head_dim, bias=False)

    def logits(self, x):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, -1).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_key_value_heads, -1).transpose(1, 2)
        k = k.repeat_interleave(self.num_heads // self.num_key_value_heads, dim=1)
        return (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)


def test_gqa_scales_a_key_head_by_the_max_over_its_query_heads():
    torch.manual_seed(0)
    attn = GQAAttention()
    with torch.no_grad():
        attn.q_proj.weight[0:6] *= 40.0   # query head 0 (key head 0) far over tau
        attn.k_proj.weight[0:6] *= 40.0
    x = torch.randn(2, 10, 24)
    with torch.no_grad():
        S = head_max_logits(attn.logits(x))
    assert float(S[0]) > TAU and float(S[1:].max()) < TAU
    qk = QKClip(attn, tau=TAU)
    assert set(qk.heads) == {"<root>"} and qk.heads["<root>"].n_kv_head == 2
    W_q, W_k = attn.q_proj.weight.clone(), attn.k_proj.weight.clone()
    qk.clip({"<root>": S})
    with torch.no_grad():
        S2 = head_max_logits(attn.logits(x))
    assert float(S2.max()) <= TAU * (1 + 1e-5)
    g = TAU / float(S[0])
    torch.testing.assert_close(attn.k_proj.weight[0:6], W_k[0:6] * math.sqrt(g))  # key head 0: gamma of query head 0
    torch.testing.assert_close(attn.q_proj.weight[0:6], W_q[0:6] * math.sqrt(g))
    assert torch.equal(attn.q_proj.weight[6:], W_q[6:])  # query head 1 shares key head 0 but is under tau: q untouched
    torch.testing.assert_close(S2[1], S[1] * math.sqrt(g))  # ... its logit shrinks with the shared key head
    assert torch.equal(attn.k_proj.weight[6:], W_k[6:])  # key head 1 (query heads 2, 3 under tau) bitwise unchanged
    torch.testing.assert_close(S2[2:], S[2:])


def test_hf_llama_through_the_monitor_sites():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.q_proj.weight.mul_(80.0)
        attn.k_proj.weight.mul_(80.0)
    qk = QKClip(model, tau=TAU)
    assert list(qk.heads) == ["model.layers.0.self_attn"]
    qk.attach(find_attention_sites(model), gate=Gate(on=True))
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    model(idx)
    S = qk.max_logits["model.layers.0.self_attn"]
    assert float(S.max()) > TAU
    qk.clip()
    model(idx)  # the same input again: every head now at or below tau (RoPE included)
    assert float(qk.max_logits["model.layers.0.self_attn"].max()) <= TAU * (1 + 1e-4)


def test_bad_config_is_refused():
    with pytest.raises(ConfigError, match="tau"):
        QKClip(TinyGPT(GPTConfig(n_layer=1)), tau=0)
    with pytest.raises(ConfigError, match="qk_norm"):
        QKClip(TinyGPT(GPTConfig(n_layer=1, qk_norm=True)))
    with pytest.raises(ConfigError, match="no attention"):
        QKClip(nn.Linear(3, 3))
    with pytest.raises(ConfigError, match="n_kv_head"):
        AttentionHeads(nn.Linear(4, 4), nn.Linear(4, 4), n_head=3, n_kv_head=2, head_dim=1)
    qk = QKClip(TinyGPT(GPTConfig(n_layer=1)))
    with pytest.raises(ConfigError, match="heads"):
        qk.clip({"transformer.h.0.attn": torch.ones(3)})
    assert set(find_qk_heads(TinyGPT(GPTConfig(n_layer=2)))) == {"transformer.h.0.attn", "transformer.h.1.attn"}


def test_runs_beside_the_monitors_attention_probe_without_a_second_forward():
    from seismo.monitor import AttentionProbe, Monitor
    from seismo.monitor.tracking import every

    model = hot_tinygpt()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights move only through QK-Clip
    mon = Monitor(model, opt, probes=[AttentionProbe(schedule=every(2))], flush_every=1)
    qk = QKClip(model, tau=TAU)
    qk.attach(find_attention_sites(model))
    forwards = []
    model.transformer.h[0].register_forward_hook(lambda *a: forwards.append(1))
    idx = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(4):
        _, loss = model(idx, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        qk.clip()
        mon.step(loss)
    mon.close()
    assert len(forwards) == 4  # one forward per step: QK-Clip reads the training forward's logits
    steps, logit_max = mon.history["attn/logit_max/transformer.h.0.attn"]
    assert steps == [0, 2]
    assert logit_max[0] > 5 * TAU and logit_max[1] <= TAU * (1 + 1e-4)  # the probe sees the clip take effect
