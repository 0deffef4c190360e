"""Attention signals: ``attn/logit_max/<module>``, ``attn/entropy/<module>``, ``attn/entropy_min/<module>``.

* Max attention logit: max over batch, heads and positions of |q.k * scale| before softmax.
  Its growth is the instability qk-layernorm removes (Wortsman et al. 2023, arXiv 2309.14322 §3.1).
* Attention entropy: mean over rows of -sum_j A_ij log A_ij; ``entropy_min`` is the minimum over
  heads of the per-head mean. Entropy collapse precedes divergence (Zhai et al. 2023,
  arXiv 2303.06296).

Attention is found through *sites*. A site knows how to hand the probe pre-softmax logits
``(b, nh, Tq, Tk)`` with masked positions at ``-inf`` for a bounded subsample of the batch on
tracked steps only. Sites exist for seismo's TinyGPT (its ``logit_tap``) and, in
:mod:`seismo.monitor.attention_sites`, for ``nn.MultiheadAttention``, Hugging Face attention
modules and any module calling ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn as nn
from torch import Tensor

from seismo.monitor.probe import HookSet, ProbeContext, ProbeFailure
from seismo.monitor.schedules import Schedule, every

__all__ = ["AttentionProbe", "AttentionSite", "TapSite", "attention_stats", "find_attention_sites"]

LogitsCallback = Callable[[Tensor], None]


class AttentionSite(Protocol):
    """One attention module. ``install`` starts delivering logits to ``callback``; it returns a
    handle with ``remove()``. A site delivers logits of training forwards only (autograd enabled),
    not of evaluation passes under ``no_grad``."""

    name: str

    def install(self, callback: LogitsCallback, max_batch: int): ...


class TapSite:
    """TinyGPT's :class:`~seismo.proxy.model.AttentionLogitTap`."""

    def __init__(self, name: str, tap: nn.Module):
        self.name = name
        self.tap = tap

    def install(self, callback: LogitsCallback, max_batch: int):
        self.tap.max_batch = max_batch
        def hook(mod, inputs, output):
            if len(inputs) < 2 or inputs[1]:
                callback(inputs[0])

        return self.tap.register_forward_hook(hook)


def find_tap_sites(model: nn.Module) -> list[AttentionSite]:
    from seismo.proxy.model import AttentionLogitTap

    sites = []
    for name, mod in model.named_modules():
        if isinstance(mod, AttentionLogitTap):
            owner = name.rsplit(".", 1)[0] if "." in name else name
            sites.append(TapSite(owner, mod))
    return sites


def find_attention_sites(model: nn.Module) -> list[AttentionSite]:
    """TinyGPT taps first; otherwise the generic finders of :mod:`attention_sites` if present."""
    sites = find_tap_sites(model)
    if sites:
        return sites
    try:
        from seismo.monitor.attention_sites import find_generic_sites
    except ImportError:
        return []
    return find_generic_sites(model)


@torch.no_grad()
def attention_stats(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(max |logit|, mean row entropy, min over heads of mean entropy) for ``(b, nh, Tq, Tk)`` logits.

    Masked positions are ``-inf``; rows that are fully masked are ignored.
    """
    z = logits.float()
    # |z| where finite, -1 elsewhere: one pass gives the max |logit| and the rows with a finite entry
    # (isfinite + where over the full tensor cost several times more on CPU).
    row_max = z.abs().nan_to_num_(nan=-1.0, posinf=-1.0).amax(-1)  # (b, nh, Tq)
    logit_max = row_max.amax().clamp_min(0)
    row_ok = row_max >= 0
    # Entropy terms p log p with p = exp(log p), and 0 where p = 0 (masked: log p = -inf) or the row
    # is nan (rows without a finite entry get weight 0 below). Setting those log p to 0 gives
    # exp(0) * 0 = 0 for them and skips exp(-inf), which is slow on CPU.
    logp = torch.log_softmax(z, dim=-1).nan_to_num_(nan=0.0, neginf=0.0)
    ent = -(logp.exp() * logp).sum(-1)  # (b, nh, Tq)
    w = row_ok.float()
    per_head = (ent * w).sum(dim=(0, 2)) / w.sum(dim=(0, 2)).clamp_min(1)
    mean = (ent * w).sum() / w.sum().clamp_min(1)
    return logit_max, mean, per_head.min()


class AttentionProbe:
    def __init__(self, name: str = "attn", schedule: Schedule | None = None, max_batch: int = 2, sites: list[AttentionSite] | None = None):
        if max_batch < 1:
            raise ValueError("AttentionProbe max_batch must be >= 1")
        self.name = name
        self.schedule = schedule or every(1)
        self.max_batch = max_batch
        self.sites = sites
        self._stats: dict[str, tuple[Tensor, Tensor, Tensor]] = {}

    def attach(self, ctx: ProbeContext) -> None:
        if self.sites is None:
            self.sites = find_attention_sites(ctx.model)
        if not self.sites:
            raise ProbeFailure(
                "found no attention module in the model (looked for TinyGPT taps, nn.MultiheadAttention, "
                "Hugging Face attention and scaled_dot_product_attention callers)"
            )
        self.hooks = HookSet(self.name, ctx.on_error)

    def arm(self, step: int) -> None:
        self._stats = {}
        for site in self.sites:
            self.hooks.add(site.install(self.hooks.guard(self._make_cb(site.name)), self.max_batch))

    def _make_cb(self, name: str) -> LogitsCallback:
        def cb(logits: Tensor) -> None:
            if name in self._stats:
                return  # with gradient accumulation, the first micro-batch stands for the step
            self._stats[name] = attention_stats(logits)
        return cb

    def collect(self, step: int, loss: Tensor | None) -> dict[str, Tensor]:
        self.hooks.remove()
        out = {}
        for name, (mx, ent, ent_min) in self._stats.items():
            out[f"attn/logit_max/{name}"] = mx
            out[f"attn/entropy/{name}"] = ent
            out[f"attn/entropy_min/{name}"] = ent_min
        self._stats = {}
        return out

    def detach(self) -> None:
        self.hooks.remove()
