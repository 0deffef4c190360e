"""Pre-softmax attention logits recomputed from an attention call's own inputs (pure functions).

:func:`sdpa_logits` follows ``F.scaled_dot_product_attention``'s reference semantics and
:func:`mha_logits` ``F.multi_head_attention_forward``'s; :func:`softmax_logits` takes the input of
an eager attention's softmax as it is. Every result is ``(b, heads, Tq, Tk)`` float32 for the first
``max_batch`` sequences, with masked positions at ``-inf``, computed under ``no_grad`` from detached
tensors. Nothing here installs a hook. The attention signals built on these logits are those of
Wortsman et al. 2023 (arXiv 2309.14322, max logit) and Zhai et al. 2023 (arXiv 2303.06296, entropy).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sdpa_logits", "mha_logits", "softmax_logits", "NEG_INF"]

NEG_INF = float("-inf")


def _as4d(t: Tensor) -> Tensor:
    """``(..., L, X) -> (N, H, L, X)``: 2-D gets batch and head 1, 3-D is (batch, L, X)."""
    if t.dim() == 2:
        return t[None, None]
    if t.dim() == 3:
        return t[:, None]
    if t.dim() == 4:
        return t
    return t.reshape(-1, *t.shape[-3:])


def _mask_floor(dtype: torch.dtype) -> float:
    """Additive mask values at or below this are "masked" (transformers uses finfo(dtype).min)."""
    return torch.finfo(dtype).min / 2 if dtype.is_floating_point else NEG_INF


def _add_float_mask(z: Tensor, m: Tensor) -> Tensor:
    """Add a float (additive) mask; very negative entries (finfo.min-style) become -inf."""
    masked = m <= _mask_floor(m.dtype)
    z = z + torch.where(masked, torch.zeros((), dtype=torch.float32, device=m.device), m.float())
    return z.masked_fill(masked, NEG_INF)


def _finite_floor_to_inf(z: Tensor, dtype: torch.dtype) -> Tensor:
    return z.masked_fill(z <= _mask_floor(dtype), NEG_INF)


@torch.no_grad()
def sdpa_logits(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    max_batch: int = 4,
) -> Tensor | None:
    """Pre-softmax logits ``(b, H, Tq, Tk)`` that ``F.scaled_dot_product_attention`` would use.

    Follows torch's reference semantics: ``scale`` defaults to ``1/sqrt(E)``; ``is_causal`` masks
    with ``ones(Tq, Tk).tril()`` (top-left aligned); a bool ``attn_mask`` is True where attention
    is allowed, a float one is added; with fewer key heads (``enable_gqa``) key head ``h // g``
    serves query head ``h``. Only the first ``max_batch`` entries of the leading dimension are used.
    Returns None for shapes this does not understand.
    """
    del enable_gqa  # a head-count mismatch is what matters; torch itself rejects it without the flag
    if query.dim() < 2 or key.dim() < 2 or query.shape[-1] != key.shape[-1]:
        return None
    rank = query.dim()
    L, E = query.shape[-2], query.shape[-1]
    S = key.shape[-2]
    q = _as4d(query.detach())
    k = _as4d(key.detach()) if key.dim() == rank else None
    if k is None:
        return None
    b = max(1, min(max_batch, max(q.shape[0], k.shape[0])))
    q = q[:b] if q.shape[0] > 1 else q
    k = k[:b] if k.shape[0] > 1 else k
    hq, hk = q.shape[1], k.shape[1]
    if hk != hq and hk != 1 and hq != 1:
        if hq % hk:
            return None
        k = k.repeat_interleave(hq // hk, dim=1)
    s = 1.0 / math.sqrt(E) if scale is None else float(scale)
    # in place on the fresh product: the same values as `* s` / `masked_fill`, two temporaries fewer
    z = torch.matmul(q.float(), k.float().transpose(-2, -1)).mul_(s)  # (b, H, L, S)
    if is_causal:
        allowed = torch.ones(L, S, dtype=torch.bool, device=z.device).tril()
        z.masked_fill_(~allowed, NEG_INF)
    if attn_mask is not None:
        m = attn_mask.detach()
        if m.dim() > rank:
            return None
        m = m.reshape((1,) * (rank - m.dim()) + tuple(m.shape))
        if rank > 4:
            m = m.expand(*query.shape[:-1], S)
        m = _as4d(m)
        m = m[:b] if m.shape[0] > 1 else m
        if m.dtype == torch.bool:
            z = z.masked_fill(~m, NEG_INF)
        else:
            z = _add_float_mask(z, m)
    return z


def _bool_or_float_mask_mha(z: Tensor, m: Tensor) -> Tensor:
    """MultiheadAttention masks: bool True = *not* allowed, float = additive."""
    if m.dtype == torch.bool:
        return z.masked_fill(m, NEG_INF)
    return _add_float_mask(z, m)


def _pad_last(m: Tensor, n: int) -> Tensor:
    if n == 0:
        return m
    return torch.cat([m, m.new_zeros(*m.shape[:-1], n)], dim=-1)  # False / 0.0: allowed


@torch.no_grad()
def mha_logits(
    mod: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    need_weights: bool = True,
    is_causal: bool = False,
    max_batch: int = 4,
) -> Tensor:
    """Pre-softmax logits ``(b, nh, L, S)`` of ``nn.MultiheadAttention`` for these inputs,
    recomputed from the module's in-projection like ``F.multi_head_attention_forward``."""
    batched = query.dim() == 3
    if batched:
        if not mod.batch_first:
            query, key = query.transpose(0, 1), key.transpose(0, 1)
    else:
        query, key = query.unsqueeze(0), key.unsqueeze(0)
        if key_padding_mask is not None and key_padding_mask.dim() == 1:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    B, L, _ = query.shape
    S = key.shape[1]
    b = max(1, min(max_batch, B))
    E, nh = mod.embed_dim, mod.num_heads
    hd = E // nh
    bias = mod.in_proj_bias
    if mod._qkv_same_embed_dim:
        wq, wk = mod.in_proj_weight[:E], mod.in_proj_weight[E : 2 * E]
    else:
        wq, wk = mod.q_proj_weight, mod.k_proj_weight
    bq, bk = (None, None) if bias is None else (bias[:E], bias[E : 2 * E])
    q = F.linear(query[:b].detach(), wq.detach(), None if bq is None else bq.detach())
    k = F.linear(key[:b].detach(), wk.detach(), None if bk is None else bk.detach())
    extra = 0
    if mod.bias_k is not None:
        k = torch.cat([k, mod.bias_k.detach().reshape(1, 1, E).expand(b, 1, E).to(k.dtype)], dim=1)
        extra += 1
    q = q.reshape(b, L, nh, hd).transpose(1, 2)
    k = k.reshape(b, S + extra, nh, hd).transpose(1, 2)
    if mod.add_zero_attn:
        k = torch.cat([k, k.new_zeros(b, nh, 1, hd)], dim=2)
        extra += 1
    z = torch.matmul(q.float(), k.float().transpose(-2, -1)).mul_(1.0 / math.sqrt(hd))  # (b, nh, L, S'), in place: as `*`
    St = S + extra
    if is_causal and key_padding_mask is None and not need_weights:
        # F.multi_head_attention_forward drops attn_mask and lets SDPA apply is_causal (top-left).
        allowed = torch.ones(L, St, dtype=torch.bool, device=z.device).tril()
        return z.masked_fill_(~allowed, NEG_INF)
    if attn_mask is not None:
        m = attn_mask.detach()
        if m.dim() == 2:
            m = m[None, None]
        else:  # (B * nh, L, S)
            m = m.reshape(-1, nh, L, S)[:b]
        z = _bool_or_float_mask_mha(z, _pad_last(m, extra))
    if key_padding_mask is not None:
        m = key_padding_mask.detach()[:b, None, None, :]
        z = _bool_or_float_mask_mha(z, _pad_last(m, extra))
    return z


def softmax_logits(x: Tensor, max_batch: int) -> Tensor:
    """The input of an eager attention's softmax as logits: first ``max_batch`` rows, float32,
    additive-mask floors (``finfo.min``-style) turned into ``-inf``."""
    z = x.detach()[: max(1, max_batch)].float()
    return _finite_floor_to_inf(z, x.dtype)
