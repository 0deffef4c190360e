"""Call interception: which attention call belongs to which site, and the reversible patches.

A call to ``F.scaled_dot_product_attention`` / ``F.softmax`` is seen only while an armed site
holds a reference to the patch of that function (:class:`_FunctionPatch`). The call is attributed to
the innermost site module being executed on this thread: each armed site module pushes a
:class:`_Install` token on a per-thread stack in a forward pre-hook and pops it in an
``always_call`` forward hook. Why the functions are patched, and what that costs, is in
docs/MONITOR.md ("Attention sites").
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from seismo.monitor.attention.logits import sdpa_logits, softmax_logits

__all__ = ["is_intercepting", "LogitsCallback"]

_log = logging.getLogger(__name__)

LogitsCallback = Callable[[Tensor], None]

_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SOFTMAX_PARAMS = ("input", "dim", "_stacklevel", "dtype")


def _bind(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict[str, Any]:
    out = dict(zip(names, args))
    out.update(kwargs)
    return out


def _logits_of_call(kind: str, args: tuple, kwargs: dict, max_batch: int) -> Tensor | None:
    if kind == "sdpa":
        a = _bind(_SDPA_PARAMS, args, kwargs)
        q, k = a.get("query"), a.get("key")
        if not isinstance(q, Tensor) or not isinstance(k, Tensor) or not q.is_floating_point():
            return None
        return sdpa_logits(
            q, k, a.get("attn_mask"), bool(a.get("is_causal", False)), a.get("scale"),
            bool(a.get("enable_gqa", False)), max_batch,
        )
    a = _bind(_SOFTMAX_PARAMS, args, kwargs)
    x, dim = a.get("input"), a.get("dim")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 4 or dim not in (-1, 3):
        return None
    with torch.no_grad():
        return softmax_logits(x, max_batch)


_LOCAL = threading.local()


def _stack() -> list["_Install"]:
    st = getattr(_LOCAL, "stack", None)
    if st is None:
        st = _LOCAL.stack = []
    return st


def _compiling() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_scripting() or torch.jit.is_tracing()


def _dispatch(kind: str, args: tuple, kwargs: dict) -> None:
    """Hand one intercepted call to the innermost site on this thread's stack (never raises)."""
    if not torch.is_grad_enabled() or _compiling():
        return
    stack = getattr(_LOCAL, "stack", None)
    if not stack or getattr(_LOCAL, "busy", False):
        return
    try:
        top = stack[-1].module
        targets = []
        for tok in reversed(stack):
            if tok.module is not top:
                break
            if tok.wants(kind):
                targets.append(tok)
        if not targets:
            return
        _LOCAL.busy = True
        try:
            for tok in targets:
                tok.done = True
                try:
                    logits = _logits_of_call(kind, args, kwargs, tok.max_batch)
                except Exception as exc:  # noqa: BLE001 - a site failure never reaches the forward; the site warns once
                    tok.site._warn(exc)
                    continue
                if logits is not None:
                    tok.deliver(logits)
        finally:
            _LOCAL.busy = False
    except Exception:  # noqa: BLE001 - belt and braces: never raise into the user's forward; logged once per thread
        if not getattr(_LOCAL, "warned", False):
            _LOCAL.warned = True
            _log.warning("seismo: attention call interception failed; the call ran unchanged", exc_info=True)


class _FunctionPatch:
    """Reference-counted, reversible replacement of one ``torch.nn.functional`` attribute."""

    def __init__(self, kind: str, attr: str):
        self.kind = kind
        self.attr = attr
        self._lock = threading.Lock()
        self._users = 0
        self._original: Callable | None = None
        self._wrapper: Callable | None = None

    @property
    def installed(self) -> bool:
        return self._wrapper is not None and getattr(F, self.attr, None) is self._wrapper

    def acquire(self) -> None:
        with self._lock:
            if self._users == 0:
                original = getattr(F, self.attr)
                self._original = original
                self._wrapper = self._make_wrapper(original)
                setattr(F, self.attr, self._wrapper)
            self._users += 1

    def release(self) -> None:
        with self._lock:
            if self._users == 0:
                return
            self._users -= 1
            if self._users == 0:
                if getattr(F, self.attr, None) is self._wrapper:
                    setattr(F, self.attr, self._original)
                self._wrapper = None
                self._original = None

    def _make_wrapper(self, original: Callable) -> Callable:
        patch, kind = self, self.kind

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            out = original(*args, **kwargs)
            if patch._wrapper is wrapper:  # a stale wrapper (someone patched on top) only forwards
                _dispatch(kind, args, kwargs)
            return out

        wrapper.__seismo_original__ = original  # type: ignore[attr-defined]
        return wrapper


_PATCHES = {
    "sdpa": _FunctionPatch("sdpa", "scaled_dot_product_attention"),
    "softmax": _FunctionPatch("softmax", "softmax"),
}


def is_intercepting(kind: str = "sdpa") -> bool:
    """True while seismo's wrapper replaces ``F.scaled_dot_product_attention`` (``"sdpa"``) or
    ``F.softmax`` (``"softmax"``)."""
    return _PATCHES[kind].installed


class _Install:
    """One arming of one site: its callback, subsample size and the calls it wants."""

    def __init__(self, site: Any, callback: LogitsCallback, max_batch: int, kinds: frozenset):
        self.site = site
        self.module = site.module
        self.callback = callback
        self.max_batch = max(1, int(max_batch))
        self.kinds = kinds
        self.active = True
        self.done = False

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
    def __init__(self, tok: _Install, hooks: list, patches: list[_FunctionPatch]):
        self._tok = tok
        self._hooks = hooks
        self._patches = patches

    def remove(self) -> None:
        self._tok.active = False
        hooks, self._hooks = self._hooks, []
        for h in hooks:
            h.remove()  # torch's RemovableHandle: idempotent, never raises
        patches, self._patches = self._patches, []
        for p in patches:
            p.release()
        st = getattr(_LOCAL, "stack", None)
        if st:
            st[:] = [t for t in st if t is not self._tok]
