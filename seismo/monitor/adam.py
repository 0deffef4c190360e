"""Adam-state signals, for any optimizer whose state has ``exp_avg`` and ``exp_avg_sq``.

With r = m_hat / (sqrt(v_hat) + eps) the per-coordinate update ratio (Kingma & Ba 2015,
arXiv 1412.6980: m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t)):

* ``adam/ratio_std/<module>`` — std of r. For i.i.d. gradients it sits near
  sqrt((1 - b1) / (1 + b1)) (0.229 at b1 = 0.9); time-correlated gradients push it towards 1.
* ``adam/ratio_bimodal/<module>`` — fraction of coordinates with |r| > 0.9: Molybog et al. 2023
  (arXiv 2304.09871) show that r turning bimodal at +-1 precedes Adam's divergence.
* ``adam/update_rms/<module>`` — RMS of r; it drops below its usual ~1 scale when gradients reach
  the eps scale (Wortsman et al. 2023, arXiv 2309.14322 §3.5).
* ``adam/eps_dominated/<module>`` — fraction of coordinates with sqrt(v_hat) < eps.
* ``adam/update_grad_cos`` — cosine between the Adam direction r and the gradient.
* ``adam/v_l1``, ``adam/v_max`` — l1 norm and max of the raw second moment ``exp_avg_sq``, the
  gradient-variance signals of Li et al. 2022 (arXiv 2108.06084).

Each quantity is read where the optimizer keeps it: the step count t from the parameter's state
(``torch.optim.Adam``/``AdamW``: a tensor) or else from its param group (pytorch-optimizer's SPAM,
Stable-SPAM, LAMB, ...: an int), see :func:`adam_step_count`; ``betas`` and ``eps`` from the
parameter's own group; with ``amsgrad=True`` the running maximum ``max_exp_avg_sq``, which is the
second moment the update divides by. r is the Adam-form ratio of the optimizer's moments: for
optimizers whose update is not exactly ``lr * r`` (SPAM scales eps by 1 / sqrt(1 - beta2^t) and
multiplies by a post-reset warm-up factor; NAdam mixes in the gradient) it describes the moments,
not the exact step.

Computed in the optimizer's post-step hook on tracked steps, from the state the step just wrote.

Sharded optimizer state (FSDP2's ``fully_shard``, tensor parallel: ``DTensor`` moments and
gradients): every signal is a sum, a count or a max over coordinates, so each rank computes them
per parameter over its **local shard** (``to_local()``, no gather) and one all-gather per mesh
dimension of the stacked per-parameter values (on tracked steps only, no host sync) turns them into
the values over the full tensors: sums and counts add across the ranks (a ``Replicate`` mesh
dimension weighted by 1 / its size, as the norms of :mod:`~seismo.monitor.gradients`), maxima take
the max. The r of each coordinate is computed from the same moments as unsharded, so the values
equal the unsharded run's up to float summation order.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from seismo.monitor.gradients import _local, _ShardedSums
from seismo.monitor.probe import HookedProbe, ProbeContext, ProbeFailure, param_modules
from seismo.monitor.tracking import Schedule

__all__ = ["AdamProbe", "adam_ratio", "adam_step_count", "adam_second_moment", "bias_corrections", "ShardedReduce"]


class ShardedReduce:
    """Per-parameter sums and maxima over local DTensor shards -> over the full tensors.

    ``sums``: (K, P) local sums, ``maxes``: (P,) local maxima, one column per parameter of the
    list given at construction. For each mesh holding DTensor parameters, one all-gather per mesh
    dimension of both (flattened together), then a weighted sum (``Replicate`` dimensions count
    1 / their size) and a max over the gathered ranks: the same order on every rank, so every
    rank gets bitwise the same values. Plain-tensor parameters stay as they are; with no DTensor
    parameter it is the identity (no collective).
    """

    def __init__(self, params: list[Tensor]):
        self.groups = _ShardedSums(params).groups

    def __call__(self, sums: Tensor, maxes: Tensor) -> tuple[Tensor, Tensor]:
        if not self.groups:
            return sums, maxes
        sums, maxes = sums.clone(), maxes.clone()
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        k = sums.shape[0]
        for process_groups, idx, weight in self.groups:
            idx, weight = idx.to(sums.device), weight.to(sums.device)
            part = sums.index_select(-1, idx) * weight
            mx = maxes.index_select(-1, idx)
            n = idx.numel()
            for pg in process_groups:
                size = dist.get_world_size(pg)
                flat = torch.cat([part.reshape(-1), mx])
                out = flat.new_empty(size * flat.numel())
                gather(out, flat, group=pg)
                out = out.view(size, -1)
                part = out[:, : k * n].sum(0).view(k, n)
                mx = out[:, k * n:].amax(0)
            sums.index_copy_(-1, idx, part)
            maxes.index_copy_(-1, idx, mx)
        return sums, maxes


def adam_step_count(state: Mapping[str, Any], group: Mapping[str, Any]) -> Tensor | int | float | None:
    """The step count t an Adam-like optimizer bias-corrects with, where it keeps it, or ``None``.

    ``torch.optim`` keeps ``step`` in each parameter's state (a tensor, on the CPU unless
    ``capturable``/``fused``); pytorch-optimizer's SPAM and Stable-SPAM (and most of that library)
    keep it in the param group (an int, which Stable-SPAM resets to 1 at a momentum reset). The
    per-parameter count wins when both exist. Nothing is moved to the host here.
    """
    step = state.get("step")
    return group.get("step") if step is None else step


def adam_second_moment(state: Mapping[str, Any], group: Mapping[str, Any]) -> Tensor:
    """The second moment the update divides by: ``max_exp_avg_sq`` with ``amsgrad=True``, else ``exp_avg_sq``."""
    if group.get("amsgrad", False) and "max_exp_avg_sq" in state:
        return state["max_exp_avg_sq"]
    return state["exp_avg_sq"]


def bias_corrections(step: Tensor | float, beta1: float, beta2: float) -> tuple[Tensor | float, Tensor | float]:
    """``(1 - beta1^t, 1 - beta2^t)`` (Kingma & Ba 2015, arXiv 1412.6980).

    A plain number gives plain floats. A step tensor stays where it is (``torch.optim`` keeps a
    0-d CPU tensor, or one on the parameters' device with ``capturable``/``fused``) and the
    corrections are 0-d tensors on its device (float64, float32 on MPS), which divide tensors on
    any device: nothing is moved to the host.
    """
    if isinstance(step, Tensor):
        t = step.detach().to(torch.float32 if step.device.type == "mps" else torch.float64)
        return 1 - torch.pow(float(beta1), t), 1 - torch.pow(float(beta2), t)
    t = float(step)
    return 1.0 - float(beta1) ** t, 1.0 - float(beta2) ** t


def adam_ratio(exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor | float, beta1: float, beta2: float, eps: float) -> tuple[Tensor, Tensor]:
    """Return (r, sqrt(v_hat)) in float32 with bias correction at ``step`` (a tensor or a number):
    ``r = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)``, the ``torch.optim.Adam`` update
    over lr (Kingma & Ba 2015, arXiv 1412.6980)."""
    bc1, bc2 = bias_corrections(step, beta1, beta2)
    # .float(): a 0-d moment (a scalar parameter, e.g. sigmaReparam's gain) divided by a 0-d float64
    # correction would promote to float64; larger moments stay float32 and .float() returns them as is
    denom = (exp_avg_sq.float() / bc2).sqrt().float()
    return ((exp_avg.float() / bc1) / (denom + eps)).float(), denom


class AdamProbe(HookedProbe):
    """The Adam-state signals of the module docstring, from the optimizer's post-step hook."""

    default_every = 10

    def __init__(self, name: str = "adam", schedule: Schedule | None = None, bimodal_threshold: float = 0.9):
        super().__init__(name, schedule)
        self.bimodal_threshold = bimodal_threshold

    def setup(self, ctx: ProbeContext) -> None:
        if ctx.optimizer is None:
            raise ProbeFailure("Adam signals need the optimizer (Monitor(model, optimizer))")
        self.opt = ctx.optimizer
        if not any("betas" in g and "eps" in g for g in ctx.optimizer.param_groups):
            # e.g. plain SGD: its state stays empty, so the post-step check below never fires.
            raise ProbeFailure(
                f"{type(ctx.optimizer).__name__} keeps no Adam state (exp_avg / exp_avg_sq, betas, eps); the Adam probe is off"
            )
        in_opt = {id(p) for g in ctx.optimizer.param_groups for p in g["params"]}
        groups = {m: [p for _, p in pl if id(p) in in_opt] for m, pl in param_modules(ctx.model).items()}
        groups = {m: pl for m, pl in groups.items() if pl}
        if not groups:
            raise ProbeFailure("none of the model's parameters is in the optimizer")
        self.owner_of = {}
        self.slot_of: dict[int, int] = {}
        self.modules = list(groups)
        params = []
        for i, plist in enumerate(groups.values()):
            for p in plist:
                self.owner_of[id(p)] = i
                self.slot_of[id(p)] = len(params)
                params.append(p)
        self._owner = torch.tensor([self.owner_of[id(p)] for p in params])
        self._reduce = ShardedReduce(params)
        self.hooks.add(ctx.optimizer.register_step_post_hook(self.guard(self._post)))

    @torch.no_grad()
    def _post(self, optimizer, args, kwargs) -> None:
        if not self.armed:
            return
        M, P = len(self.modules), len(self.slot_of)
        # per parameter: coordinates, sum r, sum r^2, count |r| > thr, count eps-dominated, sum |v|,
        # sum r*g, sum g^2; and max v. Over the local shard of a DTensor, then reduced across the mesh.
        rows: list[Tensor | None] = [None] * P
        vmax: list[Tensor | None] = [None] * P
        dev = None
        for group in optimizer.param_groups:
            betas = group.get("betas")
            eps = group.get("eps")
            if betas is None or eps is None:
                continue
            for p in group["params"]:
                st = optimizer.state.get(p)
                if not st or "exp_avg" not in st or "exp_avg_sq" not in st or id(p) not in self.owner_of:
                    continue
                step = adam_step_count(st, group)
                if step is None:
                    raise ProbeFailure(
                        f"{type(optimizer).__name__} keeps no 'step' count (parameter state or param group): "
                        "Adam's bias correction is unknown, the Adam probe is off"
                    )
                step = _local(step) if isinstance(step, Tensor) else step
                r, sv = adam_ratio(_local(st["exp_avg"]), _local(adam_second_moment(st, group)), step, betas[0],
                                   betas[1], eps)
                if dev is None:
                    dev = r.device
                    zero = torch.zeros((), device=dev)
                r2 = r.pow(2).sum()
                v = _local(st["exp_avg_sq"]).float()
                dot = gsq = zero
                if p.grad is not None:
                    g = _local(p.grad.detach()).float()
                    ok = True
                    if r.shape != g.shape:
                        # sparse-momentum optimizers (SPAM's `density`) keep the moments of the
                        # coordinates in a boolean `mask` only, flattened
                        mask = st.get("mask")
                        ok = isinstance(mask, Tensor) and mask.shape == g.shape
                        if ok:
                            g, rr = g[_local(mask)], r.reshape(-1)
                            ok = g.numel() == rr.numel()
                    else:
                        rr = r
                    if ok:
                        dot = (rr * g).sum()
                        gsq = g.pow(2).sum()
                i = self.slot_of[id(p)]
                rows[i] = torch.stack([
                    torch.ones((), device=dev) * r.numel(),
                    r.sum(),
                    r2,
                    (r.abs() > self.bimodal_threshold).sum().float(),
                    (sv < eps).sum().float(),
                    v.abs().sum(),
                    dot.float(),
                    gsq.float(),
                ])
                # an empty local shard (a parameter with fewer rows than ranks) has no max
                vmax[i] = v.amax() if v.numel() else torch.full((), float("-inf"), device=dev)
        if dev is None:
            if any(optimizer.state.values()):
                raise ProbeFailure(
                    f"{type(optimizer).__name__} keeps no Adam state (exp_avg / exp_avg_sq); the Adam probe is off"
                )
            return
        zeros8 = torch.zeros(8, device=dev)
        ninf = torch.full((), float("-inf"), device=dev)
        sums = torch.stack([zeros8 if x is None else x.to(dev) for x in rows], dim=1)  # (8, P)
        maxes = torch.stack([ninf if x is None else x.to(dev) for x in vmax])
        sums, maxes = self._reduce(sums, maxes)
        if self._owner.device != dev:
            self._owner = self._owner.to(dev)  # once: no host-to-device copy on later tracked steps
        acc = torch.zeros(M, 5, device=dev).index_add_(0, self._owner, sums[:5].T)
        n = acc[:, 0].clamp_min(1)
        mean = acc[:, 1] / n
        std = (acc[:, 2] / n - mean.pow(2)).clamp_min(0).sqrt()
        rms = (acc[:, 2] / n).sqrt()
        rsq, dot, gsq = sums[2].sum(), sums[6].sum(), sums[7].sum()
        out = {
            "adam/update_grad_cos": dot / (rsq.sqrt() * gsq.sqrt()).clamp_min(1e-30),
            "adam/v_l1": sums[5].sum(),
            "adam/v_max": maxes.amax(),
        }
        for i, m in enumerate(self.modules):
            out[f"adam/ratio_std/{m}"] = std[i]
            out[f"adam/ratio_bimodal/{m}"] = acc[i, 3] / n[i]
            out[f"adam/update_rms/{m}"] = rms[i]
            out[f"adam/eps_dominated/{m}"] = acc[i, 4] / n[i]
        self.values = out
