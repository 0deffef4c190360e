"""Building blocks against their papers' formulas."""

import math

import torch
import torch.nn as nn

from seismo.mitigate.blocks import PeriLNResidual, ResPostNormResidual, ScaledCosineAttention


def test_peri_ln_normalises_branch_input_and_output_never_the_residual():
    torch.manual_seed(0)
    seen = {}
    branch = nn.Linear(16, 16)
    branch.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0]))
    block = PeriLNResidual(branch, 16)
    x = 1000.0 * torch.randn(4, 16)
    y = block(x)
    # the branch sees a normalised input (zero mean, unit variance per row)
    assert torch.allclose(seen["in"].mean(-1), torch.zeros(4), atol=1e-4)
    assert torch.allclose(seen["in"].var(-1, unbiased=False), torch.ones(4), atol=1e-3)
    ref = x + nn.functional.layer_norm(branch(nn.functional.layer_norm(x, (16,))), (16,))
    assert torch.allclose(y, ref, atol=1e-3)
    # the residual keeps its scale: the added part is O(1) against inputs of size 1000
    assert (y - x).abs().max() < 10 and x.abs().max() > 100


def test_res_post_norm_normalises_only_the_branch_output():
    torch.manual_seed(0)
    branch = nn.Linear(8, 8)
    block = ResPostNormResidual(branch, 8)
    x = 50 * torch.randn(3, 8)
    out = block(x) - x
    assert torch.allclose(out.mean(-1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(out, nn.functional.layer_norm(branch(x), (8,)), atol=1e-5)


def test_scaled_cosine_attention_matches_reference_and_is_bounded():
    torch.manual_seed(0)
    B, H, T, D = 2, 3, 5, 4
    q, k, v = (torch.randn(B, H, T, D) * 100 for _ in range(3))
    att = ScaledCosineAttention(H)
    assert torch.allclose(att.scale().flatten(), torch.full((H,), 10.0))
    out = att(q, k, v, is_causal=True)
    logits = (q / q.norm(dim=-1, keepdim=True)) @ (k / k.norm(dim=-1, keepdim=True)).transpose(-2, -1) * 10.0
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    ref = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1) @ v
    assert torch.allclose(out, ref, atol=1e-4)
    assert logits.abs().max() <= 10.0 + 1e-4
    with torch.no_grad():
        att.logit_scale.fill_(10.0)  # exp(10) would be 22026: clamped at 100
    assert torch.allclose(att.scale().flatten(), torch.full((H,), 100.0))
    assert math.isclose(float(att.scale().max()), 100.0, rel_tol=1e-6)
