"""Attention sites: where the attention probe gets pre-softmax logits from, for any model.

A site hands the probe logits ``(b, nh, Tq, Tk)`` (float32, masked positions at ``-inf``) for the
first ``max_batch`` sequences of a training forward (autograd enabled; ``no_grad`` evaluation
passes are skipped). Site kinds: :class:`MHASite` (``nn.MultiheadAttention``, recomputed from its
inputs), :class:`ObservedSite` (a module seen computing attention by
:mod:`~seismo.monitor.attention.discovery`: the probe's default), :class:`HFAttentionSite`
(Hugging Face attention: its SDPA call or its eager softmax input) and :class:`SDPASite` (SDPA
calls only). The last three read the module's calls through a ``TorchFunctionMode``
(:mod:`~seismo.monitor.attention.interception`). :func:`find_attention_sites` /
:func:`find_generic_sites` find sites *statically* (taps by type, classes by source text), for
callers that want sites before any forward. Nothing here changes what the model computes. The
design and its trade-offs are in docs/MONITOR.md.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Iterable, Protocol

import torch
import torch.nn as nn
from torch import Tensor

from seismo.monitor.attention.interception import Gate, LogitsCallback, _bind, _Handle, _Install, _no_autocast
from seismo.monitor.attention.logits import mha_logits
from seismo.monitor.attention.tap import find_tap_sites

__all__ = ["AttentionSite", "find_attention_sites", "find_generic_sites", "MHASite", "SDPASite", "HFAttentionSite", "ObservedSite"]


class AttentionSite(Protocol):
    """One attention module. ``install`` starts delivering logits to ``callback`` and returns a
    handle with ``remove()``. A site delivers logits of training forwards only (autograd enabled),
    not of evaluation passes under ``no_grad``. Built-in sites also take ``gate``
    (:class:`~seismo.monitor.attention.interception.Gate`): installed once, they deliver only while
    ``gate.on``; a site whose ``install`` has no ``gate`` parameter is installed on every tracked
    step and removed after it (which makes ``torch.compile`` recompile)."""

    name: str

    def install(self, callback: LogitsCallback, max_batch: int): ...


def find_attention_sites(model: nn.Module) -> list[AttentionSite]:
    """The model's own taps (:class:`~seismo.monitor.attention.tap.AttentionLogitTap`) if it has
    any; otherwise the generic sites of :func:`find_generic_sites`."""
    return find_tap_sites(model) or find_generic_sites(model)


class _ModuleSite:
    """A site bound to one module: a forward pre-hook and an ``always_call`` forward hook,
    registered once, that do something only while the gate is on (a tracked step)."""

    kinds: frozenset = frozenset()

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module
        self._warned = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {type(self.module).__name__})"

    def _warn(self, exc: BaseException | str) -> None:
        if not self._warned:
            self._warned = True
            msg = exc if isinstance(exc, str) else f"cannot compute attention logits ({type(exc).__name__}: {exc}); skipped"
            warnings.warn(f"seismo: attention site '{self.name}': {msg}", RuntimeWarning, stacklevel=2)

    def _install_kinds(self) -> frozenset:
        return self.kinds

    def _on_forward(self, tok: _Install, args: tuple, kwargs: dict) -> None:
        """Called by the pre-hook of a training forward (for sites that work from the inputs)."""

    def install(self, callback: LogitsCallback, max_batch: int, gate: Gate | None = None) -> _Handle:
        """Deliver logits to ``callback`` while ``gate.on`` (always, without a gate) until the
        returned handle is removed. The hooks stay registered: ``torch.compile`` does not recompile."""
        gate = Gate(on=True) if gate is None else gate
        tok = _Install(self, callback, max_batch, self._install_kinds(), gate)

        def pre(module, args, kwargs):
            if not gate.on or tok.done or not tok.active or not torch.is_grad_enabled():
                return None
            self._on_forward(tok, args, kwargs)
            if tok.kinds and not tok.done:
                gate.stack.append(tok)
                tok.mode.__enter__()
            return None

        def post(module, args, output):
            if gate.stack and gate.stack[-1] is tok:
                gate.stack.pop()
                tok.mode.__exit__(None, None, None)
            return None

        hooks = []
        try:
            hooks.append(self.module.register_forward_pre_hook(pre, with_kwargs=True))
            hooks.append(self.module.register_forward_hook(post, always_call=True))
        except BaseException:
            _Handle(tok, hooks).remove()
            raise
        gate.tokens.append(tok)
        return _Handle(tok, hooks)


class MHASite(_ModuleSite):
    """``nn.MultiheadAttention``: logits recomputed from its inputs in a forward pre-hook."""

    kinds = frozenset()  # opaque on the stack: its internal SDPA call is not anyone else's

    _PARAMS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")

    def _on_forward(self, tok: _Install, args: tuple, kwargs: dict) -> None:
        a = _bind(self._PARAMS, args, kwargs)
        query, key = a.get("query"), a.get("key")
        if not isinstance(query, Tensor) or not isinstance(key, Tensor) or query.is_nested or key.is_nested:
            return
        tok.done = True
        try:
            with _no_autocast(query.device.type):  # fp32 logits, not re-rounded by autocast
                logits = mha_logits(
                    self.module, query, key, a.get("key_padding_mask"), a.get("attn_mask"),
                    bool(a.get("need_weights", True)), bool(a.get("is_causal", False)), tok.max_batch,
                )
        except Exception as exc:  # noqa: BLE001 - a site failure never reaches the forward; warned once
            self._warn(exc)
            return
        tok.deliver(logits)


class SDPASite(_ModuleSite):
    """A module calling ``scaled_dot_product_attention`` (under any name): its first call of a
    tracked training forward is observed and the logits recomputed from the call's query/key/mask."""

    kinds = frozenset({"sdpa"})


class ObservedSite(_ModuleSite):
    """A module seen computing attention (``scaled_dot_product_attention``, or softmax over the
    last dimension of 4-D scores) in a forward: its first such call of a tracked training forward
    gives the logits."""

    def __init__(self, name: str, module: nn.Module, kinds: Iterable[str] = ("sdpa", "softmax")):
        super().__init__(name, module)
        self.kinds = frozenset(kinds)


class HFAttentionSite(_ModuleSite):
    """A Hugging Face attention module: its SDPA call (``sdpa``) or its softmax input (``eager``)."""

    def _install_kinds(self) -> frozenset:
        config = getattr(self.module, "config", None)
        impl = getattr(config, "_attn_implementation", None)
        if not isinstance(impl, str):
            return frozenset({"sdpa", "softmax"})
        impl = impl.lower()
        if "sdpa" in impl:
            return frozenset({"sdpa"})
        if "eager" in impl:
            return frozenset({"softmax"})
        if "flash" in impl or "flex" in impl:
            self._warn(
                f"attn_implementation={impl!r} runs a fused kernel seismo cannot observe; "
                "use 'eager' or 'sdpa' to get attention signals"
            )
        return frozenset({"sdpa", "softmax"})


_HF_PREFIXES = ("transformers.", "transformers_modules.")
_HF_MARKERS = ("attention_interface", "ALL_ATTENTION_FUNCTIONS", "softmax", "scaled_dot_product_attention")


@functools.lru_cache(maxsize=None)
def _class_source(cls: type) -> str | None:
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return None


def _user_classes(cls: type) -> Iterable[type]:
    for c in cls.__mro__:
        if c is nn.Module or c is object:
            break
        yield c


def _mentions(cls: type, needles: tuple[str, ...], skip: tuple[str, ...] = ("torch.",)) -> bool | None:
    """Whether the source of ``cls`` or a base class mentions a needle (None: no source at all).
    Classes from modules starting with a ``skip`` prefix are not read."""
    seen_source = False
    for c in _user_classes(cls):
        if (c.__module__ or "").startswith(skip):
            continue
        src = _class_source(c)
        if src is None:
            continue
        seen_source = True
        if any(n in src for n in needles):
            return True
    return False if seen_source else None


def _is_hf_attention(mod: nn.Module) -> bool:
    hf = [c for c in _user_classes(type(mod)) if (c.__module__ or "").startswith(_HF_PREFIXES) and "Attention" in c.__name__]
    if not hf:
        return False
    found = _mentions(type(mod), _HF_MARKERS)
    return True if found is None else found


def _calls_sdpa(mod: nn.Module) -> bool:
    # Library classes are not read: torch's own modules (MultiheadAttention has its own site) and
    # transformers' (their attention modules have HFAttentionSite; PreTrainedModel & co. merely
    # mention SDPA in configuration code).
    return bool(_mentions(type(mod), ("scaled_dot_product_attention",), skip=("torch.", "transformers.")))


def find_generic_sites(model: nn.Module) -> list[_ModuleSite]:
    """Attention sites of ``model`` in module order, named by qualified module name.

    ``nn.MultiheadAttention`` -> :class:`MHASite`; Hugging Face attention modules (innermost ones
    only: ``BertAttention`` wrapping ``BertSelfAttention`` yields the latter) ->
    :class:`HFAttentionSite`; any other module whose class source calls
    ``scaled_dot_product_attention`` -> :class:`SDPASite`. A module that calls SDPA through a helper
    defined elsewhere is not found; pass ``AttentionProbe(sites=[SDPASite(name, module)])``.
    """
    named = [(name or "<root>", mod) for name, mod in model.named_modules()]
    sites: list[_ModuleSite] = []
    hf_modules: set[int] = set()
    for _, mod in named:
        if not isinstance(mod, nn.MultiheadAttention) and _is_hf_attention(mod):
            hf_modules.add(id(mod))
    # keep the innermost HF attention modules only
    outer: set[int] = set()
    for _, mod in named:
        if id(mod) in hf_modules and any(id(sub) in hf_modules for sub in mod.modules() if sub is not mod):
            outer.add(id(mod))
    for name, mod in named:
        if isinstance(mod, nn.MultiheadAttention):
            sites.append(MHASite(name, mod))
        elif id(mod) in hf_modules:
            if id(mod) not in outer:
                sites.append(HFAttentionSite(name, mod))
        elif _calls_sdpa(mod):
            sites.append(SDPASite(name, mod))
    return sites
