"""Logit soft-capping: ``cap * tanh(x / cap)`` (Gemma 2, Gemma Team 2024, arXiv 2408.00118, section 2).

Gemma 2 caps the attention logits at 50 and the final (vocabulary) logits at 30. The map is the
identity near 0 (slope 1), odd, smooth and bounded by ``cap``, so a logit can no longer grow without
bound however large q.k or the readout becomes; the gradient through it is ``1 - tanh^2(x / cap)``.

* :func:`softcap`: the function itself.
* :func:`apply_final_softcap`: caps the output of a model's readout (``lm_head``) with a forward
  hook, for any model.
* :func:`apply_attn_softcap`: turns on attention soft-capping in attention modules that support it:
  seismo's TinyGPT (``attn_softcap``; also the :class:`~seismo.proxy.model.GPTConfig` switch) and
  Hugging Face models whose config has ``attn_logit_softcapping`` (Gemma 2). Soft-capped attention
  cannot run in the fused SDPA kernel: it materialises the ``(T, T)`` logits (the explicit path).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from seismo.errors import ConfigError

__all__ = ["softcap", "apply_final_softcap", "apply_attn_softcap", "ATTN_SOFTCAP", "FINAL_SOFTCAP"]

#: Gemma 2's caps (arXiv 2408.00118, Table 1 notes / section 2).
ATTN_SOFTCAP = 50.0
FINAL_SOFTCAP = 30.0


def _check_cap(cap: float, field: str) -> float:
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0 or cap == float("inf"):
        raise ConfigError(f"{field} must be a positive finite number, got {cap!r}")
    return float(cap)


def softcap(x: Tensor, cap: float) -> Tensor:
    """``cap * tanh(x / cap)``: the identity for ``|x| << cap``, bounded by ``cap`` (Gemma 2, arXiv 2408.00118)."""
    return torch.tanh(x / cap) * cap


def apply_final_softcap(model: nn.Module, cap: float = FINAL_SOFTCAP, head: str = "lm_head"):
    """Soft-cap the output of ``model.<head>`` (a forward hook; Gemma 2's final-logit cap, default 30).

    Returns the hook handle (``.remove()`` undoes it). Modules returning a tuple get the cap on the
    first element."""
    cap = _check_cap(cap, "final_softcap")
    try:
        mod = model.get_submodule(head)
    except AttributeError:
        raise ConfigError(f"final_softcap: model has no module {head!r} (pass head=<the readout's name>)") from None

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (softcap(output[0], cap),) + output[1:]
        return softcap(output, cap)

    return mod.register_forward_hook(hook)


def apply_attn_softcap(model: nn.Module, cap: float = ATTN_SOFTCAP) -> int:
    """Turn on attention-logit soft-capping (default 50) wherever the model supports it; returns how many
    attention modules (or configs) were switched. A model with none raises :class:`ConfigError`."""
    cap = _check_cap(cap, "attn_softcap")
    n = 0
    for mod in model.modules():
        if hasattr(mod, "attn_softcap"):  # seismo's TinyGPT attention: the explicit (non-fused) path
            mod.attn_softcap = cap
            n += 1
    seen = set()
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and hasattr(cfg, "attn_logit_softcapping") and id(cfg) not in seen:
            seen.add(id(cfg))
            cfg.attn_logit_softcapping = cap  # Hugging Face Gemma 2: read by its eager attention
            n += 1
    if n == 0:
        raise ConfigError("attn_softcap: the model has no attention that supports soft-capping "
                          "(seismo TinyGPT attention, or a Hugging Face config with attn_logit_softcapping)")
    return n
