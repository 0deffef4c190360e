"""Gradient, parameter and update norms.

Signals: ``grad/norm`` (global, before any clipping), ``grad/norm/<module>``,
``grad/rms/<module>``, ``grad/nonfinite``; ``param/norm/<module>``, ``update/norm``,
``update/ratio/<module>`` (update norm / parameter norm).

Gradients are read at the end of the backward pass of a tracked step, so they are seen before any
clipping the loop applies and before ``zero_grad``: per-parameter post-accumulate-grad hooks,
installed only on tracked steps, note which parameters received a gradient and queue one callback
at the end of the backward (the autograd engine's ``queue_callback``, as FSDP2 does), which reduces
all of them at once (``torch._foreach_powsum``: one call for every square sum instead of a few
tensor ops per parameter in each hook). Under
``torch.distributed`` (world size > 1) the local gradients are not yet averaged at that point,
so the probe reads the averaged gradients in the optimizer's pre-step hook instead.

Sharded parameters (FSDP2's ``fully_shard``, tensor parallel: ``DTensor`` parameters and
gradients) are reduced with DTensor semantics: each rank sums the squares of its local shard,
a replicated mesh dimension is weighted by 1 / its size, and one all-reduce per mesh dimension
(on tracked steps only, no host sync) turns the local sums into the norms of the full tensors.
A parameter with a ``Partial`` placement disables the probe with a clear message.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd import Variable

try:  # torch built without distributed support has no DTensor
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - depends on the torch build
    DTensor = None

from seismo.errors import ConfigError
from seismo.monitor.probe import HookedProbe, ProbeContext, ProbeFailure, param_modules
from seismo.monitor.tracking import Schedule

__all__ = ["GradientProbe", "UpdateProbe", "use_grad_scaler"]


def _index(groups: dict[str, list]) -> tuple[list[str], list[Tensor], Tensor, Tensor]:
    names, params, owner = [], [], []
    for i, (mod, plist) in enumerate(groups.items()):
        names.append(mod)
        for _, p in plist:
            params.append(p)
            owner.append(i)
    numel = torch.zeros(len(names))
    for i, p in zip(owner, params):
        numel[i] += p.numel()
    return names, params, torch.tensor(owner), numel


#: Per-module signals of at most this many modules per tracked step; larger models are sampled round-robin.
MAX_MODULES_PER_STEP = 512


class _RoundRobin:
    """Which modules' per-module signals a tracked step reports: all of them when there are at most
    ``limit``, else the next ``limit`` in turn, so each module is reported every ceil(n / limit) tracked
    steps and the host work per step (record entries, host transfers at flush) stays bounded."""

    def __init__(self, n: int, limit: int | None):
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ConfigError(f"max_modules: must be a positive integer or None, got {limit!r}")
        self.n, self.limit, self.start = n, limit, 0

    def next(self) -> range | list[int]:
        if self.limit is None or self.n <= self.limit:
            return range(self.n)
        picked = [(self.start + k) % self.n for k in range(self.limit)]
        self.start = (self.start + self.limit) % self.n
        return picked


def _local(t: Tensor) -> Tensor:
    """The rank's own shard of a DTensor; a plain tensor unchanged."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


class _ShardedSums:
    """Turns per-parameter sums over local shards into sums over the full (DTensor) parameters.

    Built once from the parameter list; for plain tensors (no DTensor parameter) it is the identity.
    """

    def __init__(self, params: list[Tensor]):
        by_mesh: dict[int, tuple[object, list[int], list[float]]] = {}
        for i, p in enumerate(params):
            if DTensor is None or not isinstance(p, DTensor):
                continue
            weight = 1.0
            for dim, placement in enumerate(p.placements):
                if placement.is_partial():
                    raise ProbeFailure(f"parameter {i} is a DTensor with a Partial placement on mesh dimension {dim}: "
                                       "its norm is not a sum of its shards' norms")
                if placement.is_replicate():
                    weight /= p.device_mesh.size(dim)
            mesh = p.device_mesh
            entry = by_mesh.setdefault(id(mesh), (mesh, [], []))
            entry[1].append(i)
            entry[2].append(weight)
        self.groups = [
            ([mesh.get_group(d) for d in range(mesh.ndim) if mesh.size(d) > 1], torch.tensor(idx), torch.tensor(w))
            for mesh, idx, w in by_mesh.values()
        ]

    def __call__(self, sums: Tensor) -> Tensor:
        """``sums``: (..., n_params) local sums; returns the global sums (a new tensor when sharded)."""
        if not self.groups:
            return sums
        sums = sums.clone()
        for process_groups, idx, weight in self.groups:
            idx, weight = idx.to(sums.device), weight.to(sums.device)
            part = sums.index_select(-1, idx) * weight
            for pg in process_groups:  # a sum over each mesh dimension in turn is the sum over the mesh
                dist.all_reduce(part, group=pg)
            sums.index_copy_(-1, idx, part)
        return sums


def _sums_loop(grads: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Per gradient: its square sum (float32 or float64) and its count of non-finite entries.

    For CPU, where a foreach op is a C++ loop of per-tensor kernels (and the ord-0 norm of
    :func:`_sums_foreach` allocates a bool temporary per tensor): this loop is as fast, and ~1.6x
    faster for the count. A BLAS dot product per gradient (no temporary: ~1.6x faster than
    ``pow(2).sum()``). ``x - x`` is 0 for finite x and nan for inf/nan; nan -> 1 and a sum counts
    them: the same count as ``(~isfinite(g)).sum()``, ~6x cheaper on CPU (isfinite, bool sums and
    count_nonzero are not vectorised there). Exact while fewer than 2**24 entries are non-finite.
    """
    sq, bad = [], []
    for g in grads:
        flat = g.reshape(-1)
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.float()
        sq.append(torch.dot(flat, flat))
        bad.append((g - g).nan_to_num_(nan=1.0).sum())
    return sq, bad


def _sums_foreach(grads: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The same as :func:`_sums_loop` in three foreach calls for all gradients (for accelerators,
    where each op of the loop is a kernel launch): ``x * 0`` is 0 for finite x and nan otherwise,
    and an ord-0 norm counts the nans. Square sums agree with the loop's to float rounding."""
    wide = [g if g.dtype in (torch.float32, torch.float64) else g.float() for g in grads]
    return list(torch._foreach_powsum(wide, 2)), list(torch._foreach_norm(torch._foreach_mul(wide, 0.0), 0))


class GradientProbe(HookedProbe):
    """Global and per-module gradient norms (before clipping) and the count of non-finite entries.

    ``source``: ``"backward"`` reads each gradient as it is accumulated, ``"optimizer"`` in the
    optimizer's pre-step hook (needed under DDP, where the hooks see local gradients), ``"auto"``
    picks the latter when a process group of more than one rank is initialised.

    ``scaler``: the loop's ``torch.amp.GradScaler`` (fp16), or set later with
    :func:`use_grad_scaler`. Gradients read during the backward are scaled; the probe divides
    their norms by the scale the backward ran with, so the signals are the unscaled gradients'.
    (At the optimizer step ``scaler.step`` has unscaled them already.) That scale is recorded as
    ``amp/loss_scale``; its drops are the ``loss_scale_drop`` events
    (:mod:`seismo.diagnose.loss_scale`).

    ``max_modules``: per-module signals for at most this many modules per tracked step, the rest in
    turn on the next tracked steps (round-robin); the global signals cover every parameter each step.
    """

    def __init__(self, name: str = "grad", schedule: Schedule | None = None, per_module: bool = True, source: str = "auto",
                 scaler: object | None = None, max_modules: int | None = MAX_MODULES_PER_STEP):
        if source not in ("auto", "backward", "optimizer"):
            raise ValueError(f"GradientProbe source must be 'auto', 'backward' or 'optimizer', got {source!r}")
        super().__init__(name, schedule)
        self.per_module = per_module
        self.source = source
        self.scaler = scaler
        self.max_modules = max_modules
        _RoundRobin(0, max_modules)  # validates it here, not at setup
        self._scale: Tensor | None = None  # the loss scale the gradients seen this step were made with
        # the reductions of this step's backward passes: (slots or None for all, square sums, non-finite counts)
        self._parts: list[tuple[list[int] | None, Tensor, Tensor]] = []
        self._fired: list[Tensor] = []  # parameters whose gradient the running backward accumulated
        self._queued: int | None = None  # the graph task (backward) whose reduction is queued

    def setup(self, ctx: ProbeContext) -> None:
        groups = param_modules(ctx.model)
        if not groups:
            raise ProbeFailure("the model has no trainable parameters")
        self.modules, self.params, owner, numel = _index(groups)
        self._turn = _RoundRobin(len(self.modules), self.max_modules)
        self._keys = [(f"grad/norm/{m}", f"grad/rms/{m}") for m in self.modules]  # built once, not per step
        self._slot = {id(p): i for i, p in enumerate(self.params)}
        dev = self.params[0].device
        self._owner, self._numel = owner.to(dev), numel.to(dev)
        self._sharded = _ShardedSums(self.params)
        self._hook = self.guard(self._mark)  # wrapped once, registered on tracked steps
        self._reduce_fired = self.guard(self._end_of_backward)
        if self.source == "auto":
            distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
            self.source = "optimizer" if distributed else "backward"
        if self.source == "optimizer":
            if ctx.optimizer is None:
                raise ProbeFailure("reading gradients at the optimizer step needs the optimizer")
            self.hooks.add(ctx.optimizer.register_step_pre_hook(self.guard(self._on_step)))

    def _mark(self, p: Tensor) -> None:
        """Post-accumulate-grad hook: note ``p`` and, once per backward, queue the reduction."""
        if not self.armed:
            return
        self._fired.append(p)
        task = torch._C._current_graph_task_id()
        if self._queued != task:  # once per backward; a backward that raised never ran its callback
            self._queued = task
            Variable._execution_engine.queue_callback(self._reduce_fired)

    def _end_of_backward(self) -> None:
        self._queued = None
        fired, self._fired = self._fired, []
        if not fired or not self.armed:
            return
        if len(fired) == len(self.params):
            self._reduce(self.params, None)
        else:  # some parameters got no gradient in this backward: keep what an earlier one saw
            slot = self._slot
            idx = sorted({slot[id(p)] for p in fired})
            self._reduce([self.params[i] for i in idx], idx)

    @torch.no_grad()  # instead of a detach() per gradient
    def _reduce(self, params: list[Tensor], idx: list[int] | None) -> None:
        """Square sums and non-finite counts of the gradients of ``params`` (slots ``idx``, None: all)."""
        grads = [_local(p.grad) for p in params if p.grad is not None]
        if len(grads) != len(params):  # a gradient set to None since its hook ran
            keep = [i for i, p in enumerate(params) if p.grad is not None]
            idx = [(idx[i] if idx is not None else i) for i in keep]
            if not grads:
                return
        if self._scale is None and self.scaler is not None:
            scale = getattr(self.scaler, "_scale", None)  # None until the scaler's first scale(); no host sync
            if scale is not None and self.scaler.is_enabled():
                self._scale = scale.detach().clone()  # scaler.update() changes it in place before compute()
        dev0 = grads[0].device
        one_accelerator = dev0.type != "cpu" and all(g.device == dev0 for g in grads)
        sq, bad = (_sums_foreach if one_accelerator else _sums_loop)(grads)
        dev = self._owner.device
        if any(g.device != dev for g in grads):  # a model spread over devices
            sq, bad = [v.to(dev) for v in sq], [v.to(dev) for v in bad]
        # stack promotes mixed dtypes (float64 -> rounded once by .float(), as per value before)
        self._parts.append((idx, torch.stack(sq).float(), torch.stack(bad).float()))

    def install(self, step: int) -> None:
        self._parts = []
        self._fired = []
        self._queued = None
        self._scale = None
        if self.source == "backward" and not self.step_hooks.handles:
            hook = self._hook
            self.step_hooks.handles.extend(p.register_post_accumulate_grad_hook(hook) for p in self.params)

    def _on_step(self, optimizer, args, kwargs) -> None:
        if self.armed:
            self._reduce(self.params, None)

    def release(self, step: int) -> None:
        # When the next step is tracked too (the Monitor arms it right after this call) the hooks
        # stay installed instead of removing and re-registering one hook per parameter each step.
        # A schedule that raises is left to the Monitor, which calls it next and disables the probe.
        if not self.schedule(step + 1):
            self.step_hooks.remove()

    def compute(self, step: int, loss: Tensor | None) -> dict[str, Tensor]:
        parts, self._parts = self._parts, []
        if not parts:
            return {}
        dev = self._owner.device
        idx, sq, bad = parts[-1]
        if idx is not None or len(parts) > 1:  # several backward passes each saw some parameters: the last one wins
            n = len(self.params)
            sq, bad = torch.zeros(n, device=dev), torch.zeros(n, device=dev)
            for idx, s, b in parts:
                if idx is None:
                    sq, bad = s, b
                else:
                    i = torch.tensor(idx, device=dev)
                    sq, bad = sq.index_copy(0, i, s), bad.index_copy(0, i, b)
        if self._sharded.groups:
            sq, bad = self._sharded(torch.stack([sq, bad])).unbind()
        scale, self._scale = self._scale, None
        if scale is not None and self.source == "backward":
            sq = sq / scale.to(dev).float().square()
        out = {"grad/norm": sq.sum().sqrt(), "grad/nonfinite": bad.sum()}
        if scale is not None:
            out["amp/loss_scale"] = scale.float()
        if self.per_module:
            msq = torch.zeros(len(self.modules), device=dev).index_add_(0, self._owner, sq)
            norms = msq.sqrt().unbind()
            rms = (msq / self._numel).sqrt().unbind()
            keys = self._keys
            for i in self._turn.next():
                kn, kr = keys[i]
                out[kn] = norms[i]
                out[kr] = rms[i]
        return out


def use_grad_scaler(probes: object, scaler: object) -> None:
    """Make the gradient probes of ``probes`` (a Monitor or a list of probes) read unscaled gradients.

    Call it once after building the Monitor, with the loop's ``torch.amp.GradScaler``.
    """
    found = [p for p in getattr(probes, "probes", probes) if isinstance(p, GradientProbe)]
    if not found:
        raise ConfigError("probes: use_grad_scaler found no GradientProbe among the monitor's probes")
    for p in found:
        p.scaler = scaler


class UpdateProbe(HookedProbe):
    """Parameter norms and the size of the optimizer's update, per module.

    On tracked steps the parameters are copied in the optimizer's pre-step hook (one transient
    copy of the model's weights) and compared in its post-step hook. ``max_modules``: as for
    :class:`GradientProbe`, per-module signals round-robin beyond that many modules.
    """

    def __init__(self, name: str = "update", schedule: Schedule | None = None, max_modules: int | None = MAX_MODULES_PER_STEP):
        super().__init__(name, schedule)
        self.max_modules = max_modules
        _RoundRobin(0, max_modules)  # validates it here, not at setup
        self._before: list[Tensor] | None = None

    def setup(self, ctx: ProbeContext) -> None:
        if ctx.optimizer is None:
            raise ProbeFailure("update norms need the optimizer (Monitor(model, optimizer))")
        groups = param_modules(ctx.model)
        self.modules, self.params, owner, _ = _index(groups)
        self._turn = _RoundRobin(len(self.modules), self.max_modules)
        self._owner = owner.to(self.params[0].device)
        self._sharded = _ShardedSums(self.params)
        self.hooks.add(ctx.optimizer.register_step_pre_hook(self.guard(self._pre)))
        self.hooks.add(ctx.optimizer.register_step_post_hook(self.guard(self._post)))

    @torch.no_grad()
    def _pre(self, optimizer, args, kwargs) -> None:
        if self.armed:
            self._before = [_local(p.detach()).clone() for p in self.params]

    @torch.no_grad()
    def _post(self, optimizer, args, kwargs) -> None:
        if not self.armed or self._before is None:
            return
        dev = self._owner.device
        local = [_local(p.detach()) for p in self.params]
        before, self._before = self._before, None
        psq, usq = [], []
        for p, b in zip(local, before):
            if p.dtype is torch.float32 and b.dtype is torch.float32 and b.shape == p.shape:
                # The copy is not needed after this: it holds the squared update, then the squared
                # weights, so no temporary the size of the weights is allocated. (b - p)^2 is
                # bitwise (p - b)^2 (IEEE subtraction is antisymmetric), pow(2) the same op as before.
                usq.append(b.sub_(p).pow_(2).sum())
                psq.append(torch.pow(p, 2, out=b).sum())
            else:
                usq.append((p.float() - b.float()).pow_(2).sum())
                psq.append(p.float().pow(2).sum())
        psq, usq = torch.stack(psq), torch.stack(usq)
        psq, usq = self._sharded(torch.stack([psq, usq])).unbind()
        mp = torch.zeros(len(self.modules), device=dev).index_add_(0, self._owner, psq).sqrt()
        mu = torch.zeros(len(self.modules), device=dev).index_add_(0, self._owner, usq).sqrt()
        ratio = mu / mp.clamp_min(1e-30)
        out = {"update/norm": usq.sum().sqrt(), "param/norm": psq.sum().sqrt()}
        for i in self._turn.next():
            m = self.modules[i]
            out[f"param/norm/{m}"] = mp[i]
            out[f"update/ratio/{m}"] = ratio[i]
        self.values = out
