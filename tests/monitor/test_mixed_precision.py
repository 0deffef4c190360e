"""Signals under bf16 and fp16 autocast on CPU.

- Attention logits are those the kernel computes: the logits of the q and k the SDPA call receives
  (in the compute dtype); softmax of them times v reproduces the kernel's output.
- Softmax collapse is judged in the compute dtype (Prieto et al. 2025, arXiv 2501.04697 §3): logits
  with a gap of 14 collapse in bf16/fp16 and not in fp32.
- log Z is accumulated in fp32: log(e^14 + 63) to fp32 precision, which a compute-dtype
  logsumexp misses.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_compile import VOCAB, NanoGPT, T  # the nanoGPT-style model (tests/monitor is on sys.path)

from seismo.monitor import AttentionProbe, LogitsProbe, Monitor

DTYPES = [torch.bfloat16, torch.float16]


def stats(z: torch.Tensor) -> tuple[float, float]:
    """(max |logit| over allowed positions, mean row entropy) of causal logits, by hand in float64."""
    z = z.double()
    allowed = torch.ones(z.shape[-2:], dtype=torch.bool).tril()
    p = torch.softmax(z.masked_fill(~allowed, float("-inf")), dim=-1)
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    return z[..., allowed].abs().max().item(), ent.mean().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_attention_logits_are_the_kernels(dtype):
    torch.manual_seed(3)
    model = NanoGPT()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    captured = {}
    hooks = []
    for i, blk in enumerate(model.transformer.h):
        hooks.append(blk.attn.c_attn.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(("qkv", i), out.detach())))
        hooks.append(blk.attn.c_proj.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(("y", i), a[0].detach())))
    mon = Monitor(model, opt, probes=[AttentionProbe(max_batch=2)])
    x = torch.randint(0, VOCAB, (3, T))
    y = torch.randint(0, VOCAB, (3, T))
    for step in range(2):  # step 0: discovery; step 1: the sites' own observation
        with torch.autocast("cpu", dtype=dtype):
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        rec = mon.step(loss)
        for i in range(2):
            qkv = captured[("qkv", i)]
            assert qkv.dtype == dtype  # the kernel's inputs are in the compute dtype
            q, k, v = (t.view(3, T, 4, 8).transpose(1, 2) for t in qkv.split(32, dim=2))
            z = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(8)  # (3, nh, T, T)
            mx, ent = stats(z[:2])
            name = f"transformer.h.{i}.attn"
            assert math.isclose(float(rec[f"attn/logit_max/{name}"]), mx, rel_tol=1e-5), (step, i)
            assert math.isclose(float(rec[f"attn/entropy/{name}"]), ent, rel_tol=1e-4), (step, i)
            # these logits are the kernel's: softmax(z) v reproduces its output (to the dtype's precision)
            p = torch.softmax(z.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")), dim=-1)
            out = (p @ v.float()).transpose(1, 2).reshape(3, T, 32)
            kernel = captured[("y", i)]
            tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
            torch.testing.assert_close(kernel.float(), out, rtol=tol, atol=tol)
    mon.close()
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_softmax_collapse_in_compute_dtype_and_logz_in_fp32(dtype):
    gap = 14.0  # exactly representable in bf16 and fp16
    V = 64
    model = nn.Linear(V, V, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(V) * gap)  # one-hot rows -> logits (gap at the row's index, 0 elsewhere)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mon = Monitor(model, opt, probes=[LogitsProbe()])
    x = F.one_hot(torch.arange(8) % V, V).float()
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
    assert out.dtype == dtype
    loss = out.float().pow(2).mean()
    loss.backward()
    rec = mon.step(loss)
    mon.close()
    # the reference: every non-max term e^-14 ~ 8.3e-7 (63 of them: 5.2e-5) vanishes next to 1 in the
    # compute dtype (half its ulp at 1 is 2^-9 in bf16, 2^-11 in fp16), not in fp32
    z = out.detach()
    assert bool(((z - z.amax(-1, keepdim=True)).exp().sum(-1) == 1).all())
    z32 = z.float()
    assert not bool(((z32 - z32.amax(-1, keepdim=True)).exp().sum(-1) == 1).any())
    assert float(rec["logits/softmax_collapse"]) == 1.0
    logz = math.log(math.exp(gap) + V - 1)  # 14.0000522...
    assert abs(float(rec["logits/logz_mean"]) - logz) < 2e-6
    assert abs(float(torch.logsumexp(z, -1)[0]) - logz) > 4e-5  # a compute-dtype logsumexp loses it
