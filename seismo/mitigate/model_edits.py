"""Architecture-side stabilizers usable on any PyTorch model.

* :class:`QKNorm` — LayerNorm on queries and keys per head, before the dot product
  (Dehghani et al. 2023, ViT-22B, arXiv 2302.05442; Wortsman et al. 2023, arXiv 2309.14322 §3.1).
* :class:`SigmaReparam` / :func:`apply_sigma_reparam` — sigmaReparam, W_hat = gamma / sigma(W) * W
  with one power-iteration step per training forward (Zhai et al. 2023, arXiv 2303.06296).
* :func:`cosine_attention_scale` — Swin V2 scaled cosine attention's learnable per-head scale
  (Liu et al. 2022, arXiv 2111.09883): init 10, clamped at 100.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils import parametrize

__all__ = [
    "QKNorm",
    "SigmaReparam",
    "apply_sigma_reparam",
    "COSINE_SCALE_INIT",
    "COSINE_SCALE_MAX",
    "cosine_attention_scale",
]

COSINE_SCALE_INIT = 10.0
COSINE_SCALE_MAX = 100.0


class QKNorm(nn.Module):
    """LayerNorm applied to q and k over the head dimension (last axis), one norm for each.

    Input shapes ``(B, nh, T, hs)``; the norm's affine parameters are shared across heads, as in
    OLMo-core's head-wise qk-norm. After it, every head's q and k rows have zero mean and unit
    variance, so ``|q.k| / sqrt(hs)`` is bounded by ``sqrt(hs)`` times the gains.
    """

    def __init__(self, head_dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.q_norm = nn.LayerNorm(head_dim, eps=eps, bias=bias)
        self.k_norm = nn.LayerNorm(head_dim, eps=eps, bias=bias)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return self.q_norm(q), self.k_norm(k)


class SigmaReparam(nn.Module):
    """A ``torch.nn.utils.parametrize`` parametrization: ``W -> gamma / sigma(W) * W``.

    sigma(W) is the spectral norm of W (flattened to ``(out, -1)``), tracked by one step of power
    iteration per forward in training mode; the singular-vector estimate ``u`` is a buffer, so
    it is saved with the model. Zhai et al. 2023, arXiv 2303.06296, section 4.

    ``gamma_init="sigma0"`` (the paper's vision code) starts gamma at sigma(W0), so the layer is
    unchanged at step 0; ``gamma_init="one"`` (the speech code) starts at 1, so W_hat = W / sigma(W).

    Note: every access to ``module.weight`` runs one power-iteration step in training mode; read
    ``module.parametrizations.weight.original`` to inspect the raw weight without advancing it.
    """

    def __init__(self, weight: Tensor, gamma_init: str = "sigma0"):
        super().__init__()
        if gamma_init not in ("sigma0", "one"):
            raise ValueError(f"gamma_init must be 'sigma0' or 'one', got {gamma_init!r}")
        w = weight.detach().flatten(1).float()
        _, s, vh = torch.linalg.svd(w, full_matrices=False)
        self.register_buffer("u", vh[0].to(weight.dtype).clone())
        self.register_buffer("sigma", s[0].to(weight.dtype).clone())
        g = float(s[0]) if gamma_init == "sigma0" else 1.0
        self.gamma = nn.Parameter(torch.tensor(g, dtype=weight.dtype, device=weight.device))

    def forward(self, weight: Tensor) -> Tensor:
        w = weight.flatten(1)
        with torch.no_grad():
            v = F.normalize(w @ self.u, dim=0)
            u = F.normalize(w.t() @ v, dim=0) if self.training else self.u
            if self.training:
                self.u.copy_(u)
        sigma = torch.dot(v, w @ u)  # gradient flows through W
        with torch.no_grad():
            self.sigma.copy_(sigma.detach())
        return weight * (self.gamma / sigma)


def apply_sigma_reparam(model: nn.Module, gamma_init: str = "sigma0", skip: tuple[str, ...] = ()) -> list[str]:
    """Reparametrize every ``nn.Linear`` of ``model`` in place with :class:`SigmaReparam`.

    Linear layers whose qualified name is in ``skip``, and layers whose weight is shared with
    another module (tied embeddings), are left alone. Returns the names that were converted.
    """
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    done = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or name in skip or parametrize.is_parametrized(mod, "weight"):
            continue
        if counts.get(id(mod.weight), 0) > 1:
            continue
        parametrize.register_parametrization(mod, "weight", SigmaReparam(mod.weight, gamma_init))
        done.append(name)
    if not done:
        raise ValueError("apply_sigma_reparam found no (untied) nn.Linear layer to convert")
    return done


def cosine_attention_scale(logit_scale: Tensor) -> Tensor:
    """Swin V2 scale: ``exp(min(logit_scale, log 100))``; store ``logit_scale`` init ``log 10``."""
    return torch.clamp(logit_scale, max=math.log(COSINE_SCALE_MAX)).exp()
