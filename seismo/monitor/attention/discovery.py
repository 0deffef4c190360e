"""Attention discovery by observation: the modules that compute attention, seen in one forward.

:class:`AttentionDiscovery` watches the next forward of a model: a ``TorchFunctionMode`` sees
every call of ``scaled_dot_product_attention`` and softmax (``F.softmax``, ``torch.softmax``,
``Tensor.softmax``), whatever name the function was bound to, and module pre/post hooks keep the
stack of modules being executed, so each call is attributed to the innermost module running it.
A softmax counts as attention when it normalises the last dimension of 4-D scores
``(batch, heads, queries, keys)``. No source text is read: classes defined in a notebook cell,
``python -`` or ``exec`` are found like any other. The hooks exist during that forward only, and
the forward runs eagerly (``torch.compiler.set_stance("force_eager")`` until it ends), so a
compiled model is compiled once, after discovery, with the monitor's permanent hooks in place.
The calls are passed through unchanged: outputs are bitwise those of the unobserved forward.

The signals read from the sites are Wortsman et al. 2023's max attention logit (arXiv 2309.14322)
and Zhai et al. 2023's attention entropy (arXiv 2303.06296).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn
from torch import Tensor
from torch.overrides import TorchFunctionMode

from seismo.monitor.attention.interception import WATCHED, _logits_of_call

__all__ = ["AttentionDiscovery", "Found"]

_log = logging.getLogger(__name__)

#: One attention module found: (qualified name, module, kinds of calls it made).
Found = tuple[str, nn.Module, frozenset]


class _DiscoveryMode(TorchFunctionMode):
    def __init__(self, discovery: "AttentionDiscovery"):
        super().__init__()
        self.discovery = discovery

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in WATCHED and self.discovery.stack:
            self.discovery._seen(func, args, kwargs)
        return out


class AttentionDiscovery:
    """Find the attention modules of ``model`` in its next forward.

    ``start()`` registers two hooks on ``model``; its next forward is watched, then
    ``on_found(found)`` is called with the modules seen computing attention, in call order
    (an empty list when none was). During that forward ``on_logits(name, logits)`` receives the
    logits of each module's first attention call of a training forward (autograd enabled), so the
    step that discovers the sites also records them. ``ignore``: modules whose calls are not
    attributed (their own site reads them, e.g. ``nn.MultiheadAttention``).
    """

    def __init__(
        self,
        model: nn.Module,
        on_found: Callable[[list[Found]], None],
        on_logits: Callable[[str, Tensor], None] | None = None,
        max_batch: int = 2,
        ignore: tuple[nn.Module, ...] = (),
    ):
        self.model = model
        self.on_found = on_found
        self.on_logits = on_logits
        self.max_batch = max_batch
        self.ignore = {id(m) for m in ignore}
        self.stack: list[tuple[str, nn.Module]] = []
        self.found: dict[str, list] = {}  # name -> [module, kinds], in first-call order
        self.delivered: set[str] = set()
        self._root_hooks: list[Any] = []
        self._module_hooks: list[Any] = []
        self._mode: _DiscoveryMode | None = None
        self._stance: Any = None
        self.running = False

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Watch the next forward of the model (compiled callers run it eagerly until then)."""
        if self._root_hooks:
            return
        self._force_eager()
        self._root_hooks = [
            self.model.register_forward_pre_hook(self._begin, prepend=True),
            self.model.register_forward_hook(self._end, always_call=True),
        ]

    def stop(self) -> None:
        """Remove every hook, leave the mode and restore the compiler stance (idempotent)."""
        self._leave()
        hooks, self._root_hooks = self._root_hooks, []
        for h in hooks:
            h.remove()
        self._restore_stance()

    def _force_eager(self) -> None:
        set_stance = getattr(torch.compiler, "set_stance", None)
        if set_stance is None or self._stance is not None:
            return
        try:
            self._stance = set_stance("force_eager")
        except RuntimeError:  # called inside a compiled region: discovery then sees only eager forwards
            _log.debug("seismo: cannot force eager mode for attention discovery", exc_info=True)

    def _restore_stance(self) -> None:
        stance, self._stance = self._stance, None
        if stance is not None:
            stance.__exit__(None, None, None)

    # --- the watched forward ----------------------------------------------------------------
    def _begin(self, model: nn.Module, args: tuple) -> None:
        if self.running:
            return
        self.running = True
        self.stack = [("<root>", model)]
        for name, mod in model.named_modules():
            if mod is model:
                continue
            self._module_hooks.append(mod.register_forward_pre_hook(self._push(name)))
            self._module_hooks.append(mod.register_forward_hook(self._pop(mod), always_call=True))
        self._mode = _DiscoveryMode(self)
        self._mode.__enter__()

    def _end(self, model: nn.Module, args: tuple, output: Any) -> None:
        if not self.running:
            return
        if output is None:  # the forward raised (always_call hooks get None): watch the next one
            self._leave()
            self.found.clear()
            self.delivered.clear()
            return
        self.stop()
        found = [(name, mod, frozenset(kinds)) for name, (mod, kinds) in self.found.items()]
        self.on_found(found)

    def _leave(self) -> None:
        mode, self._mode = self._mode, None
        if mode is not None:
            mode.__exit__(None, None, None)
        hooks, self._module_hooks = self._module_hooks, []
        for h in hooks:
            h.remove()
        self.stack = []
        self.running = False

    def _push(self, name: str) -> Callable:
        def pre(mod: nn.Module, args: tuple) -> None:
            self.stack.append((name, mod))

        return pre

    def _pop(self, mod: nn.Module) -> Callable:
        def post(m: nn.Module, args: tuple, output: Any) -> None:
            for i in range(len(self.stack) - 1, -1, -1):
                if self.stack[i][1] is mod:
                    del self.stack[i:]
                    break

        return post

    def _seen(self, func: Any, args: tuple, kwargs: dict) -> None:
        name, mod = self.stack[-1]
        if id(mod) in self.ignore:
            return
        kind = WATCHED[func][0]
        try:
            logits = _logits_of_call(func, args, kwargs, self.max_batch)
        except Exception as exc:  # noqa: BLE001 - discovery never reaches the forward; the module is kept (it computes attention), warned
            if kind == "sdpa" and name not in self.found:
                self.found[name] = [mod, {kind}]
                warnings.warn(
                    f"seismo: attention site '{name}': cannot compute attention logits ({type(exc).__name__}: {exc}); skipped",
                    RuntimeWarning, stacklevel=2,
                )
            return
        if logits is None:
            return
        entry = self.found.setdefault(name, [mod, set()])
        entry[1].add(kind)
        if self.on_logits is not None and name not in self.delivered and torch.is_grad_enabled():
            self.delivered.add(name)
            self.on_logits(name, logits)
