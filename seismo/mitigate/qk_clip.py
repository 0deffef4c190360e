"""QK-Clip: rescale the query and key weights of every attention head whose max logit exceeds tau.

MuonClip's QK-Clip (Kimi Team 2025, "Kimi K2", arXiv 2507.20534, section 2.1): after each optimizer
step, for each head h with max pre-softmax logit ``S_h = max_ij q_i . k_j * scale`` over the batch,

    gamma_h = min(1, tau / S_h),   W_q^h <- gamma_h^alpha W_q^h,   W_k^h <- gamma_h^(1 - alpha) W_k^h

(threshold tau = 100, alpha = 0.5 as in Kimi K2 and Megatron-LM's ``clip_qk``), so that the same
input would now give a max logit of exactly tau for the clipped heads, and heads under tau are left
alone. It changes no architecture and works with any optimizer. Biases of q and k are scaled with
their weights (``q = W_q x + b_q``), so the logit scales by exactly ``gamma_h``.

**Where the max logits come from.** :class:`QKClip` does not run a forward of its own. It takes
per-head max logits from the logits the attention already exposes to observers: :meth:`QKClip.attach`
installs its callback on *attention sites* (any object with ``name`` and
``install(callback, max_batch)``, e.g. the sites of seismo's attention probe:
``qk.attach(seismo.monitor.attention.find_attention_sites(model))``; Hugging Face sites also take
an armed ``Gate(on=True)``, see :meth:`QKClip.attach`), which hand over
``(b, nh, Tq, Tk)`` logits (masked at ``-inf``) of the training forward. The max is over the
sequences the site observes (its ``max_batch``, default 8 here: raise it to cover the whole batch).
Per-head maxima can also be given directly to :meth:`QKClip.clip` (e.g. from a fused kernel).

**Layouts.** seismo's TinyGPT / nanoGPT (a fused ``c_attn`` linear with ``[q | k | v]`` rows and
``n_head``) and Hugging Face Llama-style ``q_proj`` / ``k_proj`` with grouped-query attention. With
GQA a key head is shared by ``n_head / n_kv_head`` query heads: the key head is scaled by
``gamma_g^(1 - alpha)`` with ``gamma_g`` the smallest gamma of the query heads sharing it (i.e. the
max of their logits) and each query head by its own ``gamma_h^alpha``, so every head ends at or below
tau; a head under tau that shares its key head with a clipped head is then scaled down too.
Attention with qk-norm or cosine attention is refused: there the logit does not scale with W_q.

No host synchronisation: the scale is computed on the device (``where(S > tau, tau / S, 1)``), so a
head under tau is multiplied by exactly 1.0 and stays bitwise unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.utils import parametrize

from seismo.errors import ConfigError

__all__ = ["QKClip", "AttentionHeads", "find_qk_heads", "head_max_logits"]


@dataclass
class AttentionHeads:
    """Where one attention module's query and key heads live.

    ``q`` / ``k``: the linear layers holding the query / key rows (the same fused layer for
    TinyGPT); ``q_offset`` / ``k_offset``: the first row of q / k in their weight; ``n_head`` query
    heads and ``n_kv_head`` key heads of ``head_dim`` rows each.
    """

    q: nn.Linear
    k: nn.Linear
    n_head: int
    n_kv_head: int
    head_dim: int
    q_offset: int = 0
    k_offset: int = 0

    def __post_init__(self) -> None:
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")


def _attr(mod: nn.Module, *names: str) -> Any:
    cfg = getattr(mod, "config", None)
    for n in names:
        for src in (mod, cfg):
            v = getattr(src, n, None) if src is not None else None
            if isinstance(v, int) and v > 0:
                return v
    return None


def _heads_of(mod: nn.Module) -> AttentionHeads | None:
    c_attn = getattr(mod, "c_attn", None)
    if isinstance(c_attn, nn.Linear):
        nh = _attr(mod, "n_head", "num_heads", "num_attention_heads")
        if nh is None:
            return None
        if getattr(mod, "qk_norm", None) is not None or getattr(mod, "cosine", False):
            raise ConfigError("QKClip: attention with qk_norm or cosine attention has logits that do not scale with W_q, W_k")
        d = c_attn.out_features // 3
        return AttentionHeads(c_attn, c_attn, nh, nh, d // nh, q_offset=0, k_offset=d)
    q, k = getattr(mod, "q_proj", None), getattr(mod, "k_proj", None)
    if isinstance(q, nn.Linear) and isinstance(k, nn.Linear):
        nh = _attr(mod, "num_heads", "num_attention_heads", "n_head")
        if nh is None:
            return None
        hd = q.out_features // nh
        nkv = _attr(mod, "num_key_value_heads", "n_kv_head") or k.out_features // hd
        if any(isinstance(getattr(mod, n, None), nn.Module) for n in ("q_norm", "k_norm")):
            raise ConfigError("QKClip: attention with q_norm / k_norm has logits that do not scale with W_q, W_k")
        return AttentionHeads(q, k, nh, nkv, hd)
    return None


def find_qk_heads(model: nn.Module) -> dict[str, AttentionHeads]:
    """The attention modules of ``model`` by name: fused ``c_attn`` + ``n_head`` (nanoGPT, TinyGPT) or
    ``q_proj`` / ``k_proj`` + a head count on the module or its ``config`` (Hugging Face)."""
    found = {}
    for name, mod in model.named_modules():
        heads = _heads_of(mod)
        if heads is not None:
            found[name or "<root>"] = heads
    return found


@torch.no_grad()
def head_max_logits(logits: Tensor) -> Tensor:
    """Per-head max of ``(b, nh, Tq, Tk)`` pre-softmax logits, ignoring masked (-inf) and nan entries."""
    z = logits.detach().float().nan_to_num(nan=float("-inf"), posinf=float("inf"))
    return z.amax(dim=(0, 2, 3))


class QKClip:
    """QK-Clip (Kimi K2, arXiv 2507.20534): after the optimizer step, bring every head's max logit to <= tau.

    Use::

        qk = QKClip(model, tau=100.0)
        qk.attach(find_attention_sites(model))   # from seismo.monitor.attention: no second forward
        ...
        loss.backward(); opt.step(); qk.clip()   # uses the logits of this step's forward

    ``tau``: threshold (Kimi K2 and Megatron-LM: 100). ``alpha``: the share of the scale put on
    queries (0.5: ``sqrt(tau / S)`` on each of W_q and W_k). ``heads``: the attention modules, by
    default :func:`find_qk_heads`. ``max_batch``: the sequences per forward a site hands over.
    With gradient accumulation the per-head maxima of all micro-batches of the step are combined.
    """

    def __init__(self, model: nn.Module, tau: float = 100.0, alpha: float = 0.5, heads: Mapping[str, AttentionHeads] | None = None,
                 max_batch: int = 8):
        if not tau > 0:
            raise ConfigError(f"QKClip tau must be > 0, got {tau!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"QKClip alpha must be in [0, 1], got {alpha!r}")
        self.tau = float(tau)
        self.alpha = float(alpha)
        self.max_batch = int(max_batch)
        self.heads = dict(find_qk_heads(model) if heads is None else heads)
        if not self.heads:
            raise ConfigError("QKClip found no attention module (looked for c_attn + n_head, or q_proj/k_proj + num_heads)")
        self._observed: dict[str, Tensor] = {}
        self._handles: list[Any] = []
        self._gates: list[Any] = []
        self.last_scales: dict[str, Tensor] = {}

    # -- logits in ---------------------------------------------------------------------------------
    def observe(self, name: str, logits: Tensor) -> None:
        """Record the per-head max of one forward's ``(b, nh, Tq, Tk)`` logits of module ``name``."""
        if name not in self.heads:
            return
        m = head_max_logits(logits)
        prev = self._observed.get(name)
        self._observed[name] = m if prev is None else torch.maximum(prev, m)

    def callback(self, name: str) -> Callable[[Tensor], None]:
        """A logits callback bound to module ``name`` (the signature attention sites call)."""
        return lambda logits: self.observe(name, logits)

    def attach(self, sites: Iterable[Any], gate: Any = None) -> int:
        """Install :meth:`callback` on every site (``site.name``, ``site.install(cb, max_batch)``) naming a
        known attention module; sites of other modules are skipped. Returns how many were attached.

        ``gate``: for sites that deliver once per armed step (seismo's Hugging Face / SDPA / observed
        sites), an armed ``seismo.monitor.attention.Gate(on=True)``; :meth:`clip` re-arms it (``arm()``)
        so the next step's forward is read again. Taps (TinyGPT) deliver every training forward and
        need none."""
        n = 0
        for site in sites:
            if site.name in self.heads:
                cb = self.callback(site.name)
                handle = site.install(cb, self.max_batch) if gate is None else site.install(cb, self.max_batch, gate=gate)
                self._handles.append(handle)
                n += 1
        if n == 0:
            raise ConfigError(f"QKClip.attach: no site names one of the attention modules {sorted(self.heads)}")
        if gate is not None:
            self._gates.append(gate)
        return n

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._gates.clear()

    @property
    def max_logits(self) -> dict[str, Tensor]:
        """Per-head max logits observed since the last :meth:`clip` (device tensors)."""
        return dict(self._observed)

    # -- weights out -------------------------------------------------------------------------------
    @torch.no_grad()
    def clip(self, max_logits: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Rescale W_q, W_k (and their biases) of every head over tau; returns the per-query-head logit
        scale applied (1 where untouched). ``max_logits``: per-head maxima by module name (default:
        those observed since the last call, which are then cleared)."""
        if max_logits is None:
            max_logits, self._observed = self._observed, {}
            for gate in self._gates:
                gate.arm()
        scales = {}
        for name, s in max_logits.items():
            heads = self.heads.get(name)
            if heads is None:
                raise ConfigError(f"QKClip.clip: unknown attention module {name!r}")
            scales[name] = self._clip_module(heads, torch.as_tensor(s))
        self.last_scales = scales
        return scales

    def _clip_module(self, h: AttentionHeads, s: Tensor) -> Tensor:
        if s.numel() != h.n_head:
            raise ConfigError(f"QKClip: got {s.numel()} max logits for an attention with {h.n_head} heads")
        s = s.detach().float().reshape(h.n_head)
        over = torch.isfinite(s) & (s > self.tau)
        gamma = torch.where(over, self.tau / s.clamp_min(self.tau), torch.ones_like(s))  # (n_head,)
        g_kv = gamma.view(h.n_kv_head, -1).amin(dim=1)  # smallest gamma of the query heads sharing a key head
        q_scale = gamma.pow(self.alpha) if self.alpha != 0.5 else gamma.sqrt()
        k_scale = g_kv.pow(1.0 - self.alpha) if self.alpha != 0.5 else g_kv.sqrt()
        _scale_rows(h.q, h.q_offset, q_scale, h.head_dim)
        _scale_rows(h.k, h.k_offset, k_scale, h.head_dim)
        return q_scale * k_scale.repeat_interleave(h.n_head // h.n_kv_head)


def _scale_rows(lin: nn.Linear, offset: int, per_head: Tensor, head_dim: int) -> None:
    if parametrize.is_parametrized(lin, "weight"):
        raise ConfigError("QKClip: the q/k weight is parametrized (e.g. sigmaReparam): rescaling it in place would not stick")
    n = per_head.numel() * head_dim
    rows = per_head.to(lin.weight.dtype).to(lin.weight.device).repeat_interleave(head_dim)
    lin.weight[offset:offset + n].mul_(rows.unsqueeze(1))
    if lin.bias is not None:
        lin.bias[offset:offset + n].mul_(rows)
