"""The attention probe: ``attn/logit_max/<module>``, ``attn/entropy/<module>``, ``attn/entropy_min/<module>``.

* Max attention logit: max over batch, heads and positions of |q.k * scale| before softmax.
  Its growth is the instability qk-layernorm removes (Wortsman et al. 2023, arXiv 2309.14322 §3.1).
* Attention entropy: mean over rows of -sum_j A_ij log A_ij; ``entropy_min`` is the minimum over
  heads of the per-head mean. Entropy collapse precedes divergence (Zhai et al. 2023,
  arXiv 2303.06296).

The logits come from attention *sites* (:mod:`~seismo.monitor.attention.sites`), found by
watching the first tracked step (:mod:`~seismo.monitor.attention.discovery`) and read on tracked steps.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn
from torch import Tensor

from seismo.monitor.attention.discovery import AttentionDiscovery
from seismo.monitor.attention.interception import Gate, LogitsCallback
from seismo.monitor.attention.sites import AttentionSite, MHASite, ObservedSite
from seismo.monitor.attention.tap import find_tap_sites
from seismo.monitor.probe import HookedProbe, ProbeContext, ProbeFailure
from seismo.monitor.tracking import Schedule

__all__ = ["AttentionProbe", "attention_stats"]


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
    ent = logp.exp().mul_(logp).sum(-1).neg_()  # (b, nh, Tq); in place: the same values, temporaries fewer
    w = row_ok.float()
    ent_w = ent.mul_(w)
    per_head = ent_w.sum(dim=(0, 2)) / w.sum(dim=(0, 2)).clamp_min(1)
    mean = ent_w.sum() / w.sum().clamp_min(1)
    return logit_max, mean, per_head.min()


class AttentionProbe(HookedProbe):
    """Attention max-logit and entropy per attention module, from the first ``max_batch`` sequences.

    ``sites``: the attention sites to read. By default: the model's attention taps
    (:class:`~seismo.monitor.attention.tap.AttentionLogitTap`) if it has any; otherwise its
    ``nn.MultiheadAttention`` modules plus the modules seen computing attention in the forwards of
    the first tracked step (:class:`~seismo.monitor.attention.discovery.AttentionDiscovery`), which
    is recorded too. A model with no attention disables the probe (one warning) when that step is
    collected.

    Sites are installed once and read on tracked steps only (their hooks test a :class:`Gate`), so
    ``torch.compile`` compiles one graph for tracked and one for untracked steps and never
    recompiles because of this probe.
    """

    def __init__(self, name: str = "attn", schedule: Schedule | None = None, max_batch: int = 2, sites: list[AttentionSite] | None = None):
        if max_batch < 1:
            raise ValueError("AttentionProbe max_batch must be >= 1")
        super().__init__(name, schedule)
        self.max_batch = max_batch
        self.sites = sites
        self.gate = Gate()
        self._per_step: list[AttentionSite] = []
        self._discovery: AttentionDiscovery | None = None

    def setup(self, ctx: ProbeContext) -> None:
        self.gate = Gate()
        self._on_error = ctx.on_error
        if self.sites is None:
            taps = find_tap_sites(ctx.model)
            if taps:
                self.sites = list(taps)
            else:
                self.sites = [MHASite(n or "<root>", m) for n, m in ctx.model.named_modules() if isinstance(m, nn.MultiheadAttention)]
                self._discovery = AttentionDiscovery(
                    ctx.model, self.guard(self._discovered), self.guard(self._deliver), self.max_batch,
                    ignore=tuple(s.module for s in self.sites),
                )
        elif not self.sites:
            raise ProbeFailure("sites=[] names no attention site")
        for site in self.sites:
            self._attach(site)

    def _attach(self, site: AttentionSite) -> None:
        if "gate" in inspect.signature(site.install).parameters:
            self.hooks.add(site.install(self.guard(self._make_cb(site.name)), self.max_batch, gate=self.gate))
        else:
            self._per_step.append(site)  # a custom site without a gate: installed on tracked steps only

    def _discovered(self, found: list) -> None:
        self._discovery = None
        for name, module, kinds in found:
            site = ObservedSite(name, module, kinds)
            self.sites.append(site)
            self._attach(site)
        if not self.sites:
            raise ProbeFailure(
                "found no attention in the forwards of the first tracked step (looked for attention taps, nn.MultiheadAttention, and "
                "scaled_dot_product_attention / softmax over (batch, heads, queries, keys) scores; fused kernels such as "
                "flash or flex attention cannot be observed: use attn_implementation='sdpa' or 'eager')"
            )

    def _deliver(self, name: str, logits: Tensor) -> None:
        self._make_cb(name)(logits)

    def install(self, step: int) -> None:
        self.gate.arm()
        if self._discovery is not None:
            self._discovery.start()
        for site in self._per_step:
            self.step_hooks.add(site.install(self.guard(self._make_cb(site.name)), self.max_batch))

    def release(self, step: int) -> None:
        self.gate.disarm()
        if self._discovery is not None:
            self.guard(self._discovery.finish)()  # without a forward this step, it waits for the next tracked step
        super().release(step)

    def detach(self) -> None:
        if self._discovery is not None:
            self._discovery.stop()
        self.gate.disarm()
        super().detach()

    def _make_cb(self, name: str) -> LogitsCallback:
        key = f"attn/logit_max/{name}"

        def cb(logits: Tensor) -> None:
            if key in self.values:
                return  # with gradient accumulation, the first micro-batch stands for the step
            mx, ent, ent_min = attention_stats(logits)
            self.put({key: mx, f"attn/entropy/{name}": ent, f"attn/entropy_min/{name}": ent_min})

        return cb
