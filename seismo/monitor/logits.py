"""Output-logit signals: ``logits/logz_mean``, ``logits/logz_absmax``, ``logits/max``,
``logits/softmax_collapse``, ``logits/zero_loss_frac``.

* log Z = logsumexp of a row. Its drift far from 0 late in training is the output-logit
  divergence that z-loss prevents (Wortsman et al. 2023, arXiv 2309.14322 §3.2; PaLM).
* Softmax collapse: the fraction of rows where ``sum(exp(z - max z)) == 1`` exactly in the
  logits' own dtype, i.e. every non-max term was absorbed by rounding (Prieto et al. 2025,
  arXiv 2501.04697 §3). ``zero_loss_frac`` is the fraction of rows whose largest log-probability
  is exactly 0: the loss (and gradient) of such a row is exactly 0 when its target is the argmax.

The logits are read from the model's output (a tensor, the first tensor of a tuple, or the
``.logits`` of a Hugging Face output) or from a named module; at most ``max_rows`` rows are used.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from seismo.monitor.probe import HookedProbe, ProbeContext, ProbeFailure
from seismo.monitor.tracking import Schedule

__all__ = ["LogitsProbe", "logit_stats", "extract_logits"]


def extract_logits(output) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)):
        for o in output:
            if isinstance(o, Tensor) and o.dim() >= 2 and o.is_floating_point():
                return o
    return None


@torch.no_grad()
def logit_stats(logits: Tensor) -> dict[str, Tensor]:
    """The five output-logit signals for logits ``(..., V)``."""
    z = logits.detach().reshape(-1, logits.size(-1))
    # amax, not max(dim=...): the same values without the argmax indices (several times faster on CPU)
    zmax = z.amax(dim=-1, keepdim=True)
    total = (z - zmax).exp_().sum(dim=-1)
    collapsed = total == 1  # in the logits' dtype, on purpose
    zero_loss = torch.log_softmax(z, dim=-1).amax(dim=-1) == 0
    if z.dtype == torch.float32:
        # torch.logsumexp is log(sum(exp(z - max))) + max, with an infinite max taken as 0: reuse
        # the sum above (bitwise the same result, one pass over the logits fewer).
        m = zmax.squeeze(-1)
        logz = torch.where(torch.isfinite(m), total.log() + m, m)
    else:
        logz = torch.logsumexp(z.float(), dim=-1)
    return {
        "logits/logz_mean": logz.mean(),
        "logits/logz_absmax": logz.abs().max(),
        "logits/max": zmax.max().float(),
        "logits/softmax_collapse": collapsed.float().mean(),
        "logits/zero_loss_frac": zero_loss.float().mean(),
    }


class LogitsProbe(HookedProbe):
    """The output-logit signals of the model's output (or of the module named ``output``)."""

    def __init__(self, name: str = "logits", schedule: Schedule | None = None, output: str | None = None, max_rows: int = 1024):
        super().__init__(name, schedule)
        self.output = output
        self.max_rows = max_rows

    def setup(self, ctx: ProbeContext) -> None:
        if self.output:
            try:
                self.module = ctx.model.get_submodule(self.output)
            except AttributeError:
                names = [n for n, m in ctx.model.named_modules() if isinstance(m, nn.Linear)][-5:]
                raise ProbeFailure(f"no module named {self.output!r} for the output logits; last linear layers: {names}") from None
        else:
            self.module = ctx.model
        # registered once and gated on self.armed: torch.compile keeps its graphs (no recompilation)
        self.hooks.add(self.module.register_forward_hook(self.guard(self._hook)))

    def _hook(self, module, inputs, output) -> None:
        if not self.armed or self.values or not torch.is_grad_enabled():
            return
        logits = extract_logits(output)
        if logits is None:
            raise ProbeFailure(
                f"the output of {type(module).__name__} holds no logits tensor; name the module that produces them with output='...'"
            )
        z = logits.detach().reshape(-1, logits.size(-1))[: self.max_rows]
        self.put(logit_stats(z))
