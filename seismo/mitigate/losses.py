"""Loss-side stabilizers: z-loss and StableMax.

* z-loss: Chowdhery et al. 2022 (PaLM, arXiv 2204.02311), used as an instability fix by
  Wortsman et al. 2023 (arXiv 2309.14322, section 3.2): ``coef * logsumexp(logits)**2``.
* StableMax: Prieto et al. 2025, "Grokking at the Edge of Numerical Stability"
  (arXiv 2501.04697, section 5): a softmax replacement whose normaliser grows linearly,
  not exponentially, so it cannot be absorbed by floating-point rounding (softmax collapse).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["z_loss", "stablemax_s", "stablemax", "stablemax_cross_entropy", "StableMax", "log_z"]


def log_z(logits: Tensor) -> Tensor:
    """log of the softmax normaliser, ``log sum_j exp(z_j)``, in float32 or wider."""
    return torch.logsumexp(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1)


def z_loss(logits: Tensor, coef: float = 1e-4, ignore_mask: Tensor | None = None) -> Tensor:
    """Auxiliary z-loss ``coef * mean((log Z)^2)`` over the rows of ``logits`` (..., V).

    ``ignore_mask`` (same shape as ``logits[..., 0]``, True = ignore) excludes padding rows from
    the mean, as OLMo-core and PaLM do. Reference: PaLM (arXiv 2204.02311) section 5.
    """
    if coef < 0:
        raise ValueError(f"z_loss coef must be >= 0, got {coef}")
    lz2 = log_z(logits).pow(2)
    if ignore_mask is None:
        return coef * lz2.mean()
    keep = (~ignore_mask).to(lz2.dtype)
    return coef * (lz2 * keep).sum() / keep.sum().clamp_min(1.0)


def stablemax_s(x: Tensor) -> Tensor:
    """The StableMax map s(x) = x + 1 for x >= 0 and 1 / (1 - x) for x < 0 (Prieto 2025, eq. 5).

    It is C^1 at 0 (s(0) = 1, s'(0) = 1) and always positive.
    """
    neg = x < 0
    # Evaluate each branch only where it applies, so 1/(1-x) never sees large positive x.
    safe_neg = torch.where(neg, x, torch.zeros_like(x))
    return torch.where(neg, 1.0 / (1.0 - safe_neg), x + 1.0)


def stablemax(x: Tensor, dim: int = -1) -> Tensor:
    """StableMax(x)_i = s(x_i) / sum_j s(x_j). StableMax([-2, 0, 1, 3]) = [1, 3, 6, 12] / 22."""
    s = stablemax_s(x)
    return s / s.sum(dim=dim, keepdim=True)


def stablemax_cross_entropy(
    logits: Tensor, targets: Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> Tensor:
    """Cross-entropy with StableMax instead of softmax, computed in float64 as the paper's code does.

    ``logits`` (N, V), ``targets`` (N,). Rows whose target equals ``ignore_index`` are excluded.
    Returns a tensor in ``logits.dtype``.
    """
    z = logits.double()
    log_p = torch.log(stablemax(z, dim=-1))
    keep = targets != ignore_index
    safe_t = torch.where(keep, targets, torch.zeros_like(targets))
    nll = -log_p.gather(-1, safe_t.unsqueeze(-1)).squeeze(-1)
    nll = torch.where(keep, nll, torch.zeros_like(nll))
    if reduction == "none":
        return nll.to(logits.dtype)
    if reduction == "sum":
        return nll.sum().to(logits.dtype)
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return (nll.sum() / keep.sum().clamp_min(1)).to(logits.dtype)


class StableMax(nn.Module):
    """Module form of :func:`stablemax` (Prieto et al. 2025, arXiv 2501.04697)."""

    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return stablemax(x, self.dim)

