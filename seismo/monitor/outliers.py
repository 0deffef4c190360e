"""Outlier features and massive activations of each residual block's output.

* ``outlier/kurtosis/<block>``: the kurtosis of the per-neuron activation RMS (He et al. 2024,
  "Understanding and Minimising Outlier Features in Transformer Training", arXiv 2405.19279, eq. 1):
  with ``X`` the ``(tokens, d)`` block output and ``s_j = sqrt(mean_i X_ij^2)`` the RMS of neuron j,
  ``kurt = mean_j s_j^4 / (mean_j s_j^2)^2``. It is 1 when every neuron has the same scale, about 3
  for Gaussian-spread scales, and grows towards ``d`` as a few neurons ("outlier features") dominate.
* ``outlier/massive_ratio/<block>``: the largest ``|X|`` over the median ``|X|`` (Sun et al. 2024,
  "Massive Activations in Large Language Models", arXiv 2402.17762, who call an activation massive
  when it is > 100 and ~1000x the median); ``outlier/massive_pos/<block>``: the token position
  (index in the sequence) carrying that largest activation: massive activations sit on a few
  fixed positions (the first token, delimiters) and act as attention biases.

Measured on the first ``max_batch`` sequences of tracked training forwards only (the median is the
costly part), registered once and gated on the probe's arming (no recompilation under
``torch.compile``), reduced to 0-d device tensors: no host synchronisation. Blocks as in
:mod:`~seismo.monitor.activations`. Opt-in: not part of the built-in presets, add
``OutlierProbe()`` to a probe list (:class:`~seismo.monitor.Monitor` ``probes=[...]``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from seismo.monitor.activations import find_blocks
from seismo.monitor.logits import extract_logits
from seismo.monitor.probe import HookedProbe, ProbeContext, ProbeFailure
from seismo.monitor.tracking import Schedule

__all__ = ["OutlierProbe", "outlier_stats"]


@torch.no_grad()
def outlier_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(kurtosis of per-neuron RMS, max|x| / median|x|, sequence position of max|x|) of a ``(..., T, d)``
    (or ``(tokens, d)``) activation tensor; 0-d float32 tensors on its device."""
    x = x.detach().float()
    d = x.size(-1)
    flat = x.reshape(-1, d)
    s2 = flat.pow(2).mean(0)  # s_j^2
    kurt = s2.pow(2).mean() / s2.mean().pow(2).clamp_min(1e-30)
    a = flat.abs().reshape(-1)
    i = a.argmax()
    ratio = a[i] / a.median().clamp_min(1e-30)
    T = x.size(-2) if x.dim() >= 3 else flat.size(0)
    pos = ((i // d) % T).float()
    return kurt, ratio, pos


class OutlierProbe(HookedProbe):
    """Outlier-feature kurtosis and massive-activation ratio/position per residual block (module docstring)."""

    def __init__(self, name: str = "outlier", schedule: Schedule | None = None, blocks: list[str] | None = None, max_batch: int = 4):
        if max_batch < 1:
            raise ValueError("OutlierProbe max_batch must be >= 1")
        super().__init__(name, schedule)
        self.blocks = blocks
        self.max_batch = max_batch

    def setup(self, ctx: ProbeContext) -> None:
        names = self.blocks if self.blocks is not None else find_blocks(ctx.model)
        if not names:
            raise ProbeFailure("found no residual blocks (no nn.ModuleList of layers); pass blocks=[...] names")
        for n in names:
            try:
                mod: nn.Module = ctx.model.get_submodule(n)
            except AttributeError:
                raise ProbeFailure(f"no module named {n!r} for outlier tracking") from None
            self.hooks.add(mod.register_forward_hook(self.guard(self._make_hook(n))))

    def _make_hook(self, name: str):
        key = f"outlier/kurtosis/{name}"

        def hook(module, inputs, output):
            if not self.armed or not torch.is_grad_enabled() or key in self.values:
                return
            x = extract_logits(output)
            if x is None or x.dim() < 2:
                return
            if x.dim() >= 3:
                x = x[: self.max_batch]
            kurt, ratio, pos = outlier_stats(x)
            self.put({key: kurt, f"outlier/massive_ratio/{name}": ratio, f"outlier/massive_pos/{name}": pos})

        return hook
