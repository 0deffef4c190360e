"""Attention discovery by observation: the modules that compute attention, seen in one step.

:class:`AttentionDiscovery` watches the forwards of a model during one step: a ``TorchFunctionMode`` sees
every call of ``scaled_dot_product_attention`` and softmax (``F.softmax``, ``torch.softmax``,
``Tensor.softmax``), whatever name the function was bound to, and module pre/post hooks keep the
stack of modules being executed, so each call is attributed to the innermost module running it.
A softmax counts as attention when it normalises the last dimension of 4-D scores
``(batch, heads, queries, keys)``. No source text is read: classes defined in a notebook cell,
``python -`` or ``exec`` are found like any other. The hooks exist during that step only, and the
step runs eagerly (``torch.compiler.set_stance("force_eager")`` until it is collected), so a
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
    """Find the attention modules of ``model`` by watching the forwards of one training step.

    ``start()`` registers a forward pre-hook and an ``always_call`` forward hook on every module of
    ``model``; every forward of the model or of any of its submodules until ``finish()`` is
    watched (a Lightning module's ``training_step`` calls its inner model, not its own forward).
    ``finish()`` removes the hooks and calls ``on_found(found)`` with the modules seen computing
    attention, in call order (an empty list when none was), if any forward ran; otherwise
    discovery waits for the next ``start()``. During the watched forwards ``on_logits(name,
    logits)`` receives the logits of each module's first attention call of a training forward
    (autograd enabled), so the step that discovers the sites also records them. ``ignore``:
    modules whose calls are not attributed (their own site reads them, e.g.
    ``nn.MultiheadAttention``).
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
        self.seen_forward = False
        self._hooks: list[Any] = []
        self._mode: _DiscoveryMode | None = None
        self._stance: Any = None

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Watch the model's forwards until :meth:`finish` (compiled callers run eagerly until then)."""
        if self._hooks:
            return
        self._force_eager()
        for name, mod in self.model.named_modules():
            self._hooks.append(mod.register_forward_pre_hook(self._push(name or "<root>"), prepend=True))
            self._hooks.append(mod.register_forward_hook(self._pop(mod), always_call=True))

    def finish(self) -> None:
        """End the watch: report what was found if a forward ran, else wait for the next start."""
        self.stop()
        if self.seen_forward:
            found = [(name, mod, frozenset(kinds)) for name, (mod, kinds) in self.found.items()]
            self.on_found(found)

    def stop(self) -> None:
        """Remove every hook, leave the mode and restore the compiler stance (idempotent)."""
        self._leave_mode()
        self.stack = []
        hooks, self._hooks = self._hooks, []
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

    # --- the watched forwards ---------------------------------------------------------------
    def _leave_mode(self) -> None:
        mode, self._mode = self._mode, None
        if mode is not None:
            mode.__exit__(None, None, None)

    def _push(self, name: str) -> Callable:
        def pre(mod: nn.Module, args: tuple) -> None:
            if not self.stack:  # the outermost watched forward begins
                self.seen_forward = True
                self._mode = _DiscoveryMode(self)
                self._mode.__enter__()
            self.stack.append((name, mod))

        return pre

    def _pop(self, mod: nn.Module) -> Callable:
        def post(m: nn.Module, args: tuple, output: Any) -> None:
            for i in range(len(self.stack) - 1, -1, -1):
                if self.stack[i][1] is mod:
                    del self.stack[i:]
                    break
            if not self.stack:
                self._leave_mode()

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
