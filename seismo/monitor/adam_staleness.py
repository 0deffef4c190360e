"""Adam preconditioner staleness: ``adam/stale_frac/<module>`` and ``adam/stale_frac``.

The fraction of coordinates whose current squared gradient is far below Adam's second-moment
estimate, ``g^2 < v_hat / ratio`` (ratio 100: the gradient is 10x smaller than the RMS the update
divides by). ``v`` forgets with a time constant ``1 / (1 - beta2)`` (1000 steps at 0.999), so after
a gradient spike, or when gradients shrink quickly, the preconditioner is *stale*: it describes
gradients that are gone, and the update of those coordinates is scaled down by ``|g| / sqrt(v_hat)``
for hundreds of steps (arXiv 2506.04805 studies this lag of Adam's second moment; SPAM's momentum
reset, Huang et al. 2025, arXiv 2501.06842, is one remedy). A healthy stationary run keeps the
fraction small: for Gaussian gradients ``P(g^2 < E[g^2] / 100) ~ 0.08``; a value persistently well
above that, in particular right after a spike, is the signal.

``v_hat = v / (1 - beta2^t)``, read after the step (the ``v`` that step divided by, ``max_exp_avg_sq``
under amsgrad), with ``g`` the gradient of that step; same state conventions as
:mod:`~seismo.monitor.adam`. Computed in the optimizer's post-step hook on tracked steps, into
device tensors (no host synchronisation). Opt-in: not part of the built-in presets.

Sharded state (FSDP2, tensor parallel: ``DTensor`` moments and gradients): both counts are sums,
taken per parameter over each rank's local shard and added across the mesh by one all-gather per
mesh dimension (:class:`~seismo.monitor.adam.ShardedReduce`), so they equal the unsharded counts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seismo.monitor.adam import ShardedReduce, adam_second_moment, adam_step_count, bias_corrections
from seismo.monitor.gradients import _local
from seismo.monitor.probe import HookedProbe, ProbeContext, ProbeFailure, param_modules
from seismo.monitor.tracking import Schedule

__all__ = ["AdamStalenessProbe", "stale_fraction"]


@torch.no_grad()
def stale_fraction(grad: Tensor, exp_avg_sq: Tensor, step: Tensor | float, beta2: float, ratio: float = 100.0) -> tuple[Tensor, Tensor]:
    """(number of coordinates with ``g^2 < v_hat / ratio``, number of coordinates), as float32 0-d tensors.

    Coordinates with ``v_hat == 0`` (never had a gradient) are not counted as stale."""
    _, bc2 = bias_corrections(step, 0.0, beta2)
    v_hat = exp_avg_sq.float() / bc2
    g2 = grad.detach().float().pow(2)
    stale = ((g2 * ratio < v_hat) & (v_hat > 0)).sum().float()
    return stale, torch.full((), float(g2.numel()), device=stale.device)


class AdamStalenessProbe(HookedProbe):
    """Fraction of stale Adam preconditioner coordinates, per module and overall (module docstring)."""

    default_every = 10

    def __init__(self, name: str = "adam_staleness", schedule: Schedule | None = None, ratio: float = 100.0):
        if not ratio > 1.0:
            raise ValueError(f"AdamStalenessProbe ratio must be > 1, got {ratio}")
        super().__init__(name, schedule)
        self.ratio = float(ratio)

    def setup(self, ctx: ProbeContext) -> None:
        opt = ctx.optimizer
        if opt is None:
            raise ProbeFailure("Adam staleness needs the optimizer (Monitor(model, optimizer))")
        if not any("betas" in g for g in opt.param_groups):
            raise ProbeFailure(f"{type(opt).__name__} keeps no Adam second moment (betas / exp_avg_sq); the staleness probe is off")
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        self.owner: dict[int, str] = {}
        self.slot: dict[int, int] = {}
        params = []
        for module, plist in param_modules(ctx.model).items():
            for _, p in plist:
                if id(p) in in_opt:
                    self.owner[id(p)] = module
                    self.slot[id(p)] = len(params)
                    params.append(p)
        if not self.owner:
            raise ProbeFailure("none of the model's parameters is in the optimizer")
        self._reduce = ShardedReduce(params)
        self.hooks.add(opt.register_step_post_hook(self.guard(self._post)))

    @torch.no_grad()
    def _post(self, optimizer, args, kwargs) -> None:
        if not self.armed:
            return
        counts: list[tuple[Tensor, Tensor] | None] = [None] * len(self.slot)  # per parameter: (stale, coordinates)
        seen: dict[str, list[int]] = {}  # module -> its parameters' slots, in the order first met
        for group in optimizer.param_groups:
            betas = group.get("betas")
            if betas is None:
                continue
            for p in group["params"]:
                st = optimizer.state.get(p)
                module = self.owner.get(id(p))
                if module is None or p.grad is None or not st or "exp_avg_sq" not in st:
                    continue
                step = adam_step_count(st, group)
                v = _local(adam_second_moment(st, group))
                g = _local(p.grad)
                if step is None or v.shape != g.shape:
                    continue  # no bias correction known, or moments kept for a subset (SPAM masks)
                step = _local(step) if isinstance(step, Tensor) else step
                counts[self.slot[id(p)]] = stale_fraction(g, v, step, betas[1], self.ratio)
                seen.setdefault(module, []).append(self.slot[id(p)])
        if not seen:
            return
        dev = next(c for c in counts if c is not None)[0].device
        zero = torch.zeros(2, device=dev)
        sums = torch.stack([zero if c is None else torch.stack(c).to(dev) for c in counts], dim=1)  # (2, P)
        sums, _ = self._reduce(sums, torch.zeros(len(counts), device=dev))
        out = {}
        for m, slots in seen.items():
            s, n = sums[:, slots].sum(1).unbind()
            out[f"adam/stale_frac/{m}"] = s / n.clamp_min(1)
        total_s, total_n = sums.sum(1).unbind()
        out["adam/stale_frac"] = total_s / total_n.clamp_min(1)
        self.values = out
