"""Call observation: which attention call belongs to which site, seen by a ``TorchFunctionMode``.

While an armed site module runs a training forward, its forward pre-hook pushes a token on its
probe's :class:`Gate` stack and enters a :class:`_SiteMode`; the ``always_call`` forward hook exits
it and pops the token. The mode sees every call of ``scaled_dot_product_attention`` and softmax
(``F.softmax``, ``torch.softmax``, ``Tensor.softmax``) made inside, whatever name the function was
bound to (``from torch.nn.functional import scaled_dot_product_attention as sdpa`` included),
runs it unchanged and hands the call's inputs to the innermost token (:func:`_dispatch`), which
recomputes the pre-softmax logits on the side. Nothing is patched; outputs are bitwise those of the
call. ``torch.compile`` traces the hooks and the mode (no graph break): the hooks are registered
once and read ``gate.on``, so a compiled model has one graph for tracked and one for untracked
steps, and never recompiles because of the monitor. Why, and what it costs: docs/MONITOR.md.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from seismo.monitor.attention.logits import sdpa_logits, softmax_logits

__all__ = ["is_intercepting", "LogitsCallback", "Gate", "WATCHED"]

_log = logging.getLogger(__name__)

LogitsCallback = Callable[[Tensor], None]

_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_F_SOFTMAX_PARAMS = ("input", "dim", "_stacklevel", "dtype")
_SOFTMAX_PARAMS = ("input", "dim", "dtype")


def _watched() -> dict[Any, tuple[str, tuple[str, ...]]]:
    out: dict[Any, tuple[str, tuple[str, ...]]] = {
        F.scaled_dot_product_attention: ("sdpa", _SDPA_PARAMS),
        F.softmax: ("softmax", _F_SOFTMAX_PARAMS),
        torch.softmax: ("softmax", _SOFTMAX_PARAMS),
        torch.Tensor.softmax: ("softmax", _SOFTMAX_PARAMS),
    }
    special = getattr(torch.special, "softmax", None)
    if special is not None:
        out.setdefault(special, ("softmax", _SOFTMAX_PARAMS))
    return out


#: The functions the observation mode reads, whatever name a model bound them to: function ->
#: (kind, parameter names). A constant table (read-only after import).
WATCHED = _watched()


def _bind(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict[str, Any]:
    out = dict(zip(names, args))
    out.update(kwargs)
    return out


def _no_autocast(device_type: str) -> Any:
    """A context with autocast off for ``device_type``; a no-op context (cheaper to enter) when it is off already."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else contextlib.nullcontext()


def _logits_of_call(func: Any, args: tuple, kwargs: dict, max_batch: int) -> Tensor | None:
    """Pre-softmax logits ``(b, nh, Tq, Tk)`` of one watched call, None when it is not attention
    (a softmax over anything but the last dimension of a 4-D tensor, integer inputs...)."""
    kind, names = WATCHED[func]
    a = _bind(names, args, kwargs)
    first = next((t for t in a.values() if isinstance(t, Tensor)), None)
    if first is None:
        return None
    # the logits of the q and k the kernel receives, accumulated in fp32: not re-rounded by autocast
    with _no_autocast(first.device.type):
        return _logits_of(kind, a, max_batch)


def _logits_of(kind: str, a: dict[str, Any], max_batch: int) -> Tensor | None:
    if kind == "sdpa":
        q, k = a.get("query"), a.get("key")
        if not isinstance(q, Tensor) or not isinstance(k, Tensor) or not q.is_floating_point():
            return None
        return sdpa_logits(
            q, k, a.get("attn_mask"), bool(a.get("is_causal", False)), a.get("scale"),
            bool(a.get("enable_gqa", False)), max_batch,
        )
    x, dim = a.get("input"), a.get("dim")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 4 or dim not in (-1, 3):
        return None
    with torch.no_grad():
        return softmax_logits(x, max_batch)


class Gate:
    """What the sites of one probe share: ``on`` (deliver logits: a tracked step is armed), the
    stack of site tokens being executed (the innermost gets a call) and every token, so that
    arming resets them. Under ``torch.compile`` ``on`` is guarded: one graph per value."""

    def __init__(self, on: bool = False):
        self.on = on
        self.stack: list[_Install] = []
        self.tokens: list[_Install] = []

    def arm(self) -> None:
        for tok in self.tokens:
            tok.done = False
        self.stack.clear()
        self.on = True

    def disarm(self) -> None:
        self.on = False
        self.stack.clear()


class _SiteMode(TorchFunctionMode):
    """Entered while one site module runs: hands watched calls to that site's token."""

    def __init__(self, tok: "_Install"):
        super().__init__()
        self.tok = tok

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in WATCHED:
            stack = self.tok.gate.stack
            if stack and stack[-1] is self.tok:  # an outer site's mode sees an inner site's call too
                _dispatch(self.tok, func, args, kwargs)
        return out


def _dispatch(tok: "_Install", func: Any, args: tuple, kwargs: dict) -> None:
    """Hand one watched call to ``tok``: the first attention call of a training forward per step."""
    if not torch.is_grad_enabled() or not tok.wants(WATCHED[func][0]):
        return
    try:
        logits = _logits_of_call(func, args, kwargs, tok.max_batch)
    except Exception as exc:  # noqa: BLE001 - a site failure never reaches the forward; the site warns once
        tok.done = True
        tok.site._warn(exc)
        return
    if logits is not None:
        tok.done = True
        tok.deliver(logits)


def is_intercepting(kind: str = "sdpa") -> bool:
    """True while a seismo observation mode is on this thread's torch-function mode stack (any
    ``kind``: one mode sees SDPA and softmax calls)."""
    del kind
    from seismo.monitor.attention.discovery import _DiscoveryMode  # cycle-free: discovery imports this module

    return any(isinstance(m, (_SiteMode, _DiscoveryMode)) for m in _get_current_function_mode_stack())


class _Install:
    """One site installed by one probe: its callback, subsample size, the calls it wants, its
    mode and whether it has delivered this step."""

    def __init__(self, site: Any, callback: LogitsCallback, max_batch: int, kinds: frozenset, gate: Gate):
        self.site = site
        self.module = site.module
        self.callback = callback
        self.max_batch = max(1, int(max_batch))
        self.kinds = kinds
        self.gate = gate
        self.active = True
        self.done = False
        self.mode = _SiteMode(self)

    def wants(self, kind: str) -> bool:
        return self.active and not self.done and kind in self.kinds

    def deliver(self, logits: Tensor) -> None:
        """Hand logits to the probe's callback; a failure is reported once by the site."""
        if not self.active:
            return
        try:
            self.callback(logits)
        except Exception as exc:  # noqa: BLE001 - the probe guards its callback; other callers get the site's one warning
            self.site._warn(exc)


class _Handle:
    def __init__(self, tok: _Install, hooks: list):
        self._tok = tok
        self._hooks = hooks

    def remove(self) -> None:
        tok = self._tok
        tok.active = False
        hooks, self._hooks = self._hooks, []
        for h in hooks:
            h.remove()  # torch's RemovableHandle: idempotent, never raises
        if tok in tok.gate.tokens:
            tok.gate.tokens.remove(tok)
        if tok in tok.gate.stack:
            tok.gate.stack.remove(tok)
