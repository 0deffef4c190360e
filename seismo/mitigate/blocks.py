"""Residual and attention building blocks for your own models.

* :class:`PeriLNResidual` — ``y = x + Norm_out(F(Norm_in(x)))``: Peri-LN (Kim et al. 2025,
  arXiv 2502.02732; OLMo-core's ``PeriNormTransformerBlock``). The residual stream itself is never
  normalised, only each branch's input and output.
* :class:`ResPostNormResidual` — ``y = x + Norm(F(x))``: Swin Transformer V2's residual post-norm
  (Liu et al. 2022, arXiv 2111.09883), also OLMo-2's "reordered norm".
* :class:`ScaledCosineAttention` — Swin V2 scaled cosine attention:
  ``softmax(cos(q_i, k_j) * s_h) v`` with a learnable per-head scale ``s_h`` initialised to 10 and
  clamped at 100, so attention logits are bounded by construction.

Wrap any branch (attention, MLP) you already have: ``PeriLNResidual(my_mlp, d_model)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from seismo.mitigate.model_edits import COSINE_SCALE_INIT, cosine_attention_scale

__all__ = ["PeriLNResidual", "ResPostNormResidual", "ScaledCosineAttention"]


def _norm(dim: int, eps: float, bias: bool, kind: str) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {kind!r}")


class PeriLNResidual(nn.Module):
    """``x + norm_out(branch(norm_in(x)))`` (Peri-LN). ``branch`` maps (..., dim) to (..., dim)."""

    def __init__(self, branch: nn.Module, dim: int, eps: float = 1e-5, bias: bool = True, norm: str = "layernorm"):
        super().__init__()
        self.norm_in = _norm(dim, eps, bias, norm)
        self.branch = branch
        self.norm_out = _norm(dim, eps, bias, norm)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return x + self.norm_out(self.branch(self.norm_in(x), *args, **kwargs))


class ResPostNormResidual(nn.Module):
    """``x + norm(branch(x))`` (Swin V2 residual post-norm)."""

    def __init__(self, branch: nn.Module, dim: int, eps: float = 1e-5, bias: bool = True, norm: str = "layernorm"):
        super().__init__()
        self.branch = branch
        self.norm = _norm(dim, eps, bias, norm)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return x + self.norm(self.branch(x, *args, **kwargs))


class ScaledCosineAttention(nn.Module):
    """Attention on cosine similarities with a learnable per-head scale (init 10, max 100).

    ``forward(q, k, v, attn_mask=None, is_causal=False)`` with q, k, v of shape (B, nh, T, hs);
    runs through fused ``scaled_dot_product_attention``. ``|logit| <= scale <= 100`` always.
    """

    def __init__(self, n_head: int, init_scale: float = COSINE_SCALE_INIT):
        super().__init__()
        if n_head < 1 or init_scale <= 0:
            raise ValueError("ScaledCosineAttention needs n_head >= 1 and init_scale > 0")
        self.logit_scale = nn.Parameter(torch.full((n_head, 1, 1), math.log(init_scale)))

    def scale(self) -> Tensor:
        """The per-head scale actually applied, ``exp(min(logit_scale, log 100))``, shape (nh, 1, 1)."""
        return cosine_attention_scale(self.logit_scale)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        qn = F.normalize(q, dim=-1) * self.scale()
        kn = F.normalize(k, dim=-1)
        return F.scaled_dot_product_attention(qn, kn, v, attn_mask=attn_mask, is_causal=is_causal, scale=1.0)
