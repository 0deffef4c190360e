"""The attention tap: how a model hands its pre-softmax attention logits to the monitor.

A model that computes attention itself (seismo's TinyGPT, any nanoGPT-style model) puts one
:class:`AttentionLogitTap` in each attention module and calls it with the logits it computes
anyway. While nothing is hooked on the tap (untracked steps) the model skips that work
(:meth:`AttentionLogitTap.observed`). The monitor finds taps by type (:func:`find_tap_sites`), so it
works with any model that implements this, and knows no model in particular.
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from seismo.monitor.attention.interception import Gate, LogitsCallback

__all__ = ["AttentionLogitTap", "TapSite", "find_tap_sites"]


class AttentionLogitTap(nn.Module):
    """Hook point for pre-softmax attention logits.

    Register a forward hook on it; the hook receives ``(module, (logits, in_training_step), logits)``
    with ``logits`` of shape ``(b, nh, T, T)`` for the first ``max_batch`` sequences, computed
    without gradient, scaled exactly as the attention scales them, and with masked (future)
    positions set to ``-inf``. ``in_training_step`` is True when the attention ran with autograd
    enabled (a training forward) rather than under ``no_grad`` (evaluation). Nothing is computed
    while no hook is registered, nor, while seismo's own hook is the only one, on steps seismo does
    not track (its gate is off: ``torch.compile`` keeps one graph for each case).
    """

    def __init__(self, max_batch: int = 4):
        super().__init__()
        self.max_batch = max_batch
        self.seismo_gate: Gate | None = None

    def observed(self) -> bool:
        gate = self.seismo_gate
        if gate is not None and len(self._forward_hooks) == 1 and not self._forward_pre_hooks:
            return gate.on
        return bool(self._forward_hooks) or bool(self._forward_pre_hooks)

    def forward(self, logits: Tensor, in_training_step: bool = True) -> Tensor:
        return logits


class TapSite:
    """The attention site of one :class:`AttentionLogitTap`, named after the module owning it."""

    def __init__(self, name: str, tap: AttentionLogitTap):
        self.name = name
        self.tap = tap

    def install(self, callback: LogitsCallback, max_batch: int, gate: Gate | None = None) -> "_TapHandle":
        """Deliver the tap's logits to ``callback`` while ``gate.on`` (always, without a gate)."""
        gate = Gate(on=True) if gate is None else gate
        self.tap.max_batch = max_batch

        def hook(mod, inputs, output):
            if gate.on and (len(inputs) < 2 or inputs[1]):
                callback(inputs[0])

        handle = _TapHandle(self.tap, self.tap.register_forward_hook(hook))
        self.tap.seismo_gate = gate
        return handle


class _TapHandle:
    def __init__(self, tap: AttentionLogitTap, hook):
        self.tap, self.hook = tap, hook

    def remove(self) -> None:
        self.hook.remove()
        self.tap.seismo_gate = None


def find_tap_sites(model: nn.Module) -> list[TapSite]:
    """One :class:`TapSite` per :class:`AttentionLogitTap` in ``model``, in module order."""
    sites = []
    for name, mod in model.named_modules():
        if isinstance(mod, AttentionLogitTap):
            owner = name.rsplit(".", 1)[0] if "." in name else name
            sites.append(TapSite(owner, mod))
    return sites
