"""Residual-stream activations: ``act/rms/<block>`` and ``act/max/<block>``.

Per-block RMS and max |x| of each residual block's output. Pre-LN stacks grow hidden-state
variance with depth and develop "massive activations" (Kim et al. 2025, Peri-LN, arXiv 2502.02732;
Sun et al. 2024, arXiv 2402.17762). Blocks are the children of the first ``nn.ModuleList`` of
same-typed modules (``transformer.h`` in GPT-2 and TinyGPT, ``model.layers`` in Llama), or the
names the user gives.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from seismo.monitor.logits import extract_logits
from seismo.monitor.probe import HookedProbe, ProbeContext, ProbeFailure
from seismo.monitor.tracking import Schedule

__all__ = ["ActivationProbe", "find_blocks"]


def find_blocks(model: nn.Module) -> list[str]:
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 1 and len({type(c) for c in mod}) == 1:
            if any(p.requires_grad for p in mod.parameters()):
                return [f"{name}.{i}" if name else str(i) for i in range(len(mod))]
    return []


class ActivationProbe(HookedProbe):
    """RMS and max |x| of each residual block's output (``blocks``: module names, default found)."""

    def __init__(self, name: str = "act", schedule: Schedule | None = None, blocks: list[str] | None = None):
        super().__init__(name, schedule)
        self.blocks = blocks

    def setup(self, ctx: ProbeContext) -> None:
        names = self.blocks if self.blocks is not None else find_blocks(ctx.model)
        if not names:
            raise ProbeFailure("found no residual blocks (no nn.ModuleList of layers); pass blocks=[...] names")
        self.modules = {}
        for n in names:
            try:
                self.modules[n] = ctx.model.get_submodule(n)
            except AttributeError:
                raise ProbeFailure(f"no module named {n!r} for activation tracking") from None
        # registered once and gated on self.armed: torch.compile keeps its graphs (no recompilation)
        for n, m in self.modules.items():
            self.hooks.add(m.register_forward_hook(self.guard(self._make_hook(n))))


    def _make_hook(self, name: str):
        k_rms, k_max = f"act/rms/{name}", f"act/max/{name}"  # built once, not per call

        def hook(module, inputs, output):
            if not self.armed or not torch.is_grad_enabled() or k_rms in self.values:
                return
            x = extract_logits(output)
            if x is None:
                return
            with torch.no_grad():
                x = x.detach().float()
                # max |x| = max(max x, -min x) without an |x| temporary; abs() maps -0.0 to 0.0
                lo, hi = torch.aminmax(x)
                self.put({k_rms: x.pow(2).mean().sqrt(), k_max: torch.maximum(hi, -lo).abs()})
        return hook
