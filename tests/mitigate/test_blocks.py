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


def _attention_weights(att: ScaledCosineAttention, q, k) -> torch.Tensor:
    """The block's own attention weights: with v = the identity, out[..., i, :] is row i of softmax."""
    B, H, T, _ = q.shape
    v = torch.eye(T, dtype=q.dtype).expand(B, H, T, T)
    return att(q, k, v, is_causal=True)


def _cosine_reference(q, k, scale: float) -> torch.Tensor:
    """Swin V2 (arXiv 2111.09883, eq. 2), written out: softmax(cos(q_i, k_j) * scale), causal."""
    T = q.shape[-2]
    cos = torch.einsum("bhid,bhjd->bhij", q, k) / (q.norm(dim=-1)[..., :, None] * k.norm(dim=-1)[..., None, :])
    logits = (cos * scale).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(logits, -1)


def test_scaled_cosine_attention_matches_the_paper_and_bounds_its_logits():
    torch.manual_seed(0)
    B, H, T, D = 2, 3, 5, 4
    q, k = (torch.randn(B, H, T, D) * 100 for _ in range(2))  # dot products ~1e4: plain attention is one-hot
    att = ScaledCosineAttention(H)
    assert torch.allclose(att.scale().flatten(), torch.full((H,), 10.0))
    w = _attention_weights(att, q, k)
    assert torch.allclose(w, _cosine_reference(q, k, 10.0), atol=1e-5)
    # the logits the block applied are bounded by the scale: within a row, two weights differ by a
    # factor of at most exp(2 * 10) (a plain dot-product attention here gives factors of ~exp(1e4))
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    logw = w.log().masked_fill(~causal, float("nan"))
    spread = logw.nan_to_num(float("-inf")).amax(-1) - logw.nan_to_num(float("inf")).amin(-1)
    assert float(spread.max()) <= 2 * 10.0 + 1e-3
    assert float(spread.max()) > 5.0  # the inputs do use the range (the bound is not trivially met)
    plain = torch.softmax((q @ k.transpose(-2, -1) / D**0.5).masked_fill(~causal, float("-inf")), -1)
    assert float(plain[..., 1:, :].amax(-1).min()) > 0.999  # what the block prevents: one-hot rows

    with torch.no_grad():
        att.logit_scale.fill_(10.0)  # exp(10) would be 22026: clamped at 100
    assert torch.allclose(att.scale().flatten(), torch.full((H,), 100.0))
    assert math.isclose(float(att.scale().max()), 100.0, rel_tol=1e-6)
    # the clamp acts in the forward pass too: the weights are those of scale 100, not 22026
    w = _attention_weights(att, q.double(), k.double())
    assert torch.allclose(w, _cosine_reference(q.double(), k.double(), 100.0), atol=1e-6)
