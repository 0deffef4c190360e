"""The Guard's checkpoints of a sharded model (FSDP2's ``fully_shard``, tensor parallel: DTensor
parameters), through ``torch.distributed.checkpoint`` (DCP).

* In memory (the ring): ``get_state_dict(model, optimizer)`` (sharded: DTensor values keyed by
  parameter name), every DTensor kept as a CPU copy of this rank's local shard plus its mesh,
  placements, shape and stride; a rollback rebuilds the DTensors on the shard's device and loads
  them with ``set_state_dict``. Each rank holds only its own shard.
* On disk: every rank calls ``torch.distributed.checkpoint.save`` of the live sharded state into
  a temporary directory ``.guard-step{step:09d}-e{epoch}.dcp.tmp`` and writes its own small file
  ``rank{r}.pt`` there (spike window, torch RNG, ``stateful`` objects: per rank); after a barrier,
  rank 0 renames the directory to ``guard-step{step:09d}-e{epoch}.dcp`` (``os.replace``, then a
  directory fsync) and tells the other ranks whether that worked. A directory without that name
  is never read, so a crash at any point leaves the previous snapshot loadable.
* Loading a snapshot directory: the template is ``get_state_dict`` of the live objects (cloned),
  filled by ``torch.distributed.checkpoint.load`` (a collective: every rank loads the same path).

An optimizer with no state yet (before its first step) is checkpointed as its plain
``state_dict()`` (only param groups): ``get_state_dict`` would initialise the state with a
zero-gradient, zero-LR ``optimizer.step()``, which changes Adam's step counter. Loading a snapshot
into a fresh optimizer does run that initialising step (DCP needs the state's shapes).
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from seismo._io import atomic_torch_save, fsync_dir
from seismo.mitigate.guard.reporting import logger
from seismo.mitigate.guard.snapshots import restore_loop_state
from seismo.mitigate.guard.window import SpikeWindow

__all__ = ["is_sharded", "capture", "restore", "ShardedSnapshotWriter", "load_dir", "remove", "DCP_SUFFIX"]

DCP_SUFFIX = ".dcp"
FORMAT = "seismo.guard.checkpoint/1"


def _dtensor_cls() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (FSDP2, tensor parallel)."""
    cls = _dtensor_cls()
    return cls is not None and any(isinstance(p, cls) for p in model.parameters())


class _Shard:
    """A CPU copy of one rank's local shard of a DTensor, with what rebuilds the DTensor."""

    __slots__ = ("local", "device", "mesh", "placements", "shape", "stride")

    def __init__(self, t: Any):
        local = t.to_local().detach()
        self.device = local.device
        self.local = local.to("cpu", copy=True)
        self.mesh, self.placements = t.device_mesh, tuple(t.placements)
        self.shape, self.stride = t.shape, t.stride()

    def rebuild(self) -> Tensor:
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(self.local.to(self.device, copy=True), self.mesh, self.placements, run_check=False,
                                  shape=self.shape, stride=self.stride)


def _to_cpu(obj: Any) -> Any:
    """A deep copy: DTensors as :class:`_Shard`, plain tensors copied to the CPU."""
    cls = _dtensor_cls()
    if cls is not None and isinstance(obj, cls):
        return _Shard(obj)
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return copy.deepcopy(obj)  # a ring entry must not change with the live object


def _rebuild(obj: Any) -> Any:
    """Inverse of :func:`_to_cpu`: fresh DTensors (on their shard's device) and tensor copies."""
    if isinstance(obj, _Shard):
        return obj.rebuild()
    if isinstance(obj, Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _rebuild(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rebuild(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_rebuild(v) for v in obj)
    return obj


def _rng() -> dict[str, Any]:
    rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _live_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict | None]:
    """``(model state, optimizer state)`` as DCP's sharded state dicts; the optimizer's is None
    while it has no state (see the module docstring)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if not optimizer.state:
        return get_model_state_dict(model), None
    return get_state_dict(model, optimizer)


def capture(step: int, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer, stateful: Mapping[str, Any],
            window: SpikeWindow) -> dict:
    """The sharded counterpart of :func:`seismo.mitigate.guard.snapshots.capture` (this rank's shards)."""
    msd, osd = _live_state(model, optimizer)
    return {
        "format": FORMAT, "sharded": True, "step": step, "epoch": epoch,
        "model": _to_cpu(msd),
        "optimizer": _to_cpu(osd) if osd is not None else None,
        "optimizer_groups": _to_cpu(optimizer.state_dict()) if osd is None else None,
        "stateful": {k: _to_cpu(o.state_dict()) for k, o in stateful.items()},
        "window": window.state_dict(),
        "rng": _rng(),
    }


def restore(ck: Mapping, model: nn.Module, optimizer: torch.optim.Optimizer, stateful: Mapping[str, Any],
            window: SpikeWindow, *, restore_rng: bool, warn: Callable[[str, str], None]) -> int:
    """Load a sharded :func:`capture` (or a loaded snapshot directory) into the live objects."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    if ck.get("format") != FORMAT or not ck.get("sharded"):
        raise ValueError("not a seismo Guard checkpoint of a sharded model")
    if ck["optimizer"] is not None:
        set_state_dict(model, optimizer, model_state_dict=_rebuild(ck["model"]), optim_state_dict=_rebuild(ck["optimizer"]))
    else:  # taken before the optimizer's first step: back to no state at all
        set_model_state_dict(model, _rebuild(ck["model"]))
        optimizer.load_state_dict(_rebuild(ck["optimizer_groups"]))
    return restore_loop_state(ck, stateful, window, restore_rng=restore_rng, warn=warn, copy_state=_rebuild)


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def remove(path: Path) -> None:
    """Delete a snapshot (a ``.dcp`` directory or a file); already gone is fine."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass  # another rank or the pruner removed it first


class ShardedSnapshotWriter:
    """Writes DCP snapshots on every rank, synchronously, at the step boundary (the same
    interface as :class:`seismo.mitigate.guard.snapshots.SnapshotWriter`, which writes from a
    background thread on rank 0). A DCP save is a collective; running it in a thread next to
    the training loop's own collectives could interleave them differently on different ranks.

    ``submit(path, payload)`` saves the *live* sharded state (the Guard submits right after
    taking ``payload`` or restoring it, so they are equal) with ``payload``'s step, epoch,
    window, RNG and ``stateful`` objects. The first failure (any rank) is kept in :attr:`error`
    on every rank; later submissions are dropped.
    """

    def __init__(self, directory: Path, keep: int, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int,
                 list_snapshots: Callable[[Path], list]):
        self.dir, self.keep, self.model, self.optimizer, self.rank = directory, keep, model, optimizer, rank
        self._list = list_snapshots
        self.error: tuple[Path, BaseException] | None = None
        self.written = 0

    def submit(self, path: Path, payload: dict) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, raised on every rank

        if self.error is not None:
            return
        tmp = path.with_name(f".{path.name}.tmp")
        failure: BaseException | None = None
        try:
            if self.rank == 0 and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)  # a killed writer's leftovers
            dist.barrier()
            msd, osd = _live_state(self.model, self.optimizer)
            dcp.save({"model": msd, "optimizer": osd} if osd is not None else {"model": msd}, checkpoint_id=str(tmp))
            extra = {k: payload[k] for k in ("format", "step", "epoch", "stateful", "window", "rng", "optimizer_groups")}
            extra["sharded"] = True
            atomic_torch_save(extra, tmp / f"rank{self.rank}.pt")
        except CheckpointException as exc:  # DCP's: every rank's failures, with tracebacks; keep one line per rank
            fails = getattr(exc, "failures", {}) or {}
            failure = OSError("; ".join(f"rank {r}: {_one_line(e[0] if isinstance(e, tuple) else e)}"
                                        for r, e in sorted(fails.items())) or _one_line(exc))
        except Exception as exc:  # noqa: BLE001 - a full disk must not kill training; the Guard reports it
            failure = exc
        gathered: list[Any] = [None] * dist.get_world_size()
        # the barrier: every rank has written (None) or failed (what went wrong)
        dist.all_gather_object(gathered, None if failure is None else _one_line(failure))
        failed = [(r, what) for r, what in enumerate(gathered) if what is not None]
        if not failed and self.rank == 0:
            try:
                os.replace(tmp, path)
                fsync_dir(self.dir)
            except OSError as exc:
                failure = exc
            else:
                self._prune()
        verdict = [None if failure is None else _one_line(failure)]
        dist.broadcast_object_list(verdict, src=0)  # rank 0's rename
        if not failed and verdict[0] is None:
            self.written += 1
            return
        if failure is None:
            what = "; ".join(f"rank {r}: {w}" for r, w in failed) or f"rank 0: {verdict[0]}"
            failure = OSError(f"the snapshot was not completed ({what})")
        self.error = (path, failure)
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)

    def drain(self) -> None:
        """Nothing is pending: every write finishes in :meth:`submit`."""

    def close(self) -> None:
        """Nothing to stop (no thread)."""

    def _prune(self) -> None:
        files = sorted(self._list(self.dir))
        for _, _, p in files[: max(0, len(files) - self.keep)]:
            try:
                remove(p)
            except OSError as exc:  # an old snapshot left behind is harmless (pruned next time)
                logger.debug("seismo Guard: could not prune %s (%r)", p, exc)


def load_dir(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> dict:
    """A snapshot directory loaded into clones of the live state (nothing live changes, except
    that a stateless optimizer is initialised, see the module docstring). A collective: every
    rank must call it with the same path. Raises ``ValueError`` on every rank when any rank fails
    (so all ranks fall back to the same older snapshot)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    extra, failure = None, None
    try:
        extra = torch.load(path / f"rank{rank}.pt", map_location="cpu", weights_only=True)
        if not isinstance(extra, dict) or extra.get("format") != FORMAT or not extra.get("sharded"):
            raise ValueError(f"rank{rank}.pt is not a seismo Guard snapshot of a sharded model")
    except Exception as exc:  # noqa: BLE001 - shared with the other ranks below, then raised on all of them
        failure = _one_line(exc)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, failure)  # a rank's own file failing must not leave the others in dcp.load
    failed = [(r, what) for r, what in enumerate(gathered) if what is not None]
    if failed:
        raise ValueError("; ".join(f"rank {r}: {what}" for r, what in failed))
    assert extra is not None
    empty = extra.get("optimizer_groups") is not None
    if empty:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        msd, osd = get_model_state_dict(model), None
    else:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, optimizer)
    state = {"model": _rebuild(_to_cpu(msd))}
    if osd is not None:
        state["optimizer"] = _rebuild(_to_cpu(osd))
    try:
        dcp.load(state, checkpoint_id=str(path))
    except CheckpointException as exc:  # a BaseException, raised on every rank
        fails = getattr(exc, "failures", {}) or {}
        raise ValueError("; ".join(f"rank {r}: {_one_line(e[0] if isinstance(e, tuple) else e)}"
                                   for r, e in sorted(fails.items())) or _one_line(exc)) from None
    ck = dict(extra)
    ck["model"] = _to_cpu(state["model"])
    ck["optimizer"] = _to_cpu(state["optimizer"]) if osd is not None else None
    return ck
