"""The Guard: skip spiking steps and roll back past bad data, in any training loop.

    guard = Guard(model, optimizer, policy="rollback", ckpt_dir="runs/exp/guard")
    guard.resume()                          # continue a restarted job (a no-op on an empty directory)
    for i in guard.steps(total_steps):      # i: the data index to train on (skipped ranges jumped over)
        x, y = get_batch(i)                 # data must be a function of the index
        loss = loss_fn(model(x), y)
        loss.backward()
        guard.step(loss)                    # decide, step the optimizer (or not), zero the grads
    guard.close()

Two policies (see docs/GUARD.md):

* ``"skip"``: a step whose loss or gradient is non-finite, or whose loss / gradient norm is a
  spike (robust z-score over the last ``window`` accepted values, see :class:`GuardConfig`),
  changes nothing: no parameter update, no moment update, no optimizer step-counter advance, no
  weight decay. The spike never enters the window (the flaw PEERS.md notes in OLMo-core's rule).
* ``"rollback"``: skip as above; when a spike does not recover (``max_consecutive_skips``
  consecutive skipped steps, or skips still coming ``recovery_steps`` after the first one),
  restore a checkpoint taken at least ``rewind`` steps before the spike started, skip every
  batch the failed trajectory saw plus ``skip_ahead`` more, optionally lower the LR, and go on.
  This is PaLM's remedy (Chowdhery et al. 2022, arXiv 2204.02311: "re-started training from a
  checkpoint roughly 100 steps before the spike started, and skipped roughly 200-500 data
  batches"; discussed by Molybog et al. 2023, arXiv 2304.09871). After ``max_rollbacks``
  rollbacks within ``retry_window`` batches the Guard raises :class:`GuardGaveUp`.

How a step is skipped without a host synchronisation (``skip_mode``)
-------------------------------------------------------------------
The decision is a 0-d device tensor. Zeroing the gradients is *not* a skip: Adam would still
advance its moments and step counter and apply weight decay. The Guard works with unchanged
``torch.optim`` optimizers, so it uses one of:

* ``"fused"`` (optimizers built with ``fused=True``: Adam, AdamW, SGD). The decision is handed
  to the fused kernel as ``found_inf``, the channel ``GradScaler`` uses: the kernel leaves the
  parameters and moments untouched and the step counter is decremented back. Cost: none.
* ``"mask"`` (any optimizer whose state tensors live on the parameters' device and are updated
  in place). Before ``optimizer.step()`` the parameters and state tensors are copied into
  preallocated buffers (``torch._foreach_copy_``); afterwards every tensor is set to
  ``torch.where(skip, saved, new)``, which is exact (a NaN update cannot leak through, unlike
  an arithmetic blend). Cost: one extra copy of parameters + optimizer state in memory (for
  Adam 3x the parameter bytes) and about three extra passes over that memory per step.
* ``"sync"``: read the decision on the host and call ``optimizer.step()`` only when applying.
  No extra memory; one host sync per step. On a CPU that "sync" is a memory read, so it is the
  cheapest choice there.

``"auto"`` (the default) picks ``fused`` when the optimizer is fused, ``sync`` on CPU and
``mask`` otherwise, and falls back to ``sync`` with a warning when ``mask`` cannot be exact
(e.g. AdamW's step counters stay on the CPU unless it is built with ``capturable=True`` or
``fused=True``). A step whose optimizer state does not exist yet (the first one) is always
decided on the host. Bookkeeping (counters, warnings, events, the rollback decision) reads the
per-step records once every ``sync_every`` steps and at checkpoint steps; a skipped step
changes nothing, so deciding a rollback a few steps late only costs those steps.

Checkpoints (rollback policy): every ``interval`` steps a CPU copy of the model, optimizer,
``stateful`` objects, RNG and detector state goes into an in-memory ring of ``ring_size``;
every ``disk_interval`` steps that copy is also written to ``ckpt_dir`` by a background thread
(temporary file, fsync, ``os.replace``, directory fsync), so a ``kill -9`` during a write leaves
the previous snapshot loadable; snapshots load with ``weights_only=True``. A JSON tracker
(``guard_tracker.json``, written atomically) records every rollback, the skipped data ranges and
the LR factor, so a new Guard on the same ``ckpt_dir`` calling :meth:`Guard.resume` does the
same thing the failed job did.

DDP: every rank computes its flags, the flags are all-reduced with MAX before they are applied,
so all ranks skip together and roll back together; only rank 0 writes files, warnings and events.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import queue
import re
import threading
import warnings
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from seismo._io import atomic_torch_save, atomic_write_json
from seismo._stats import MAD_TO_SIGMA
from seismo.events import Event

__all__ = [
    "Guard", "GuardConfig", "GuardGaveUp", "GuardWarning", "GUARD_KINDS", "POLICIES", "SKIP_MODES", "REASONS",
    "TRACKER_NAME", "data_index",
]

POLICIES = ("skip", "rollback")
SKIP_MODES = ("auto", "fused", "mask", "sync")
#: Event kinds the Guard writes (public API, like the detectors' ``KINDS``).
GUARD_KINDS = ("guard_skip", "guard_reset", "guard_rollback", "guard_gave_up")
#: Why a step was skipped, in the order of the flag vector.
REASONS = ("nonfinite_loss", "nonfinite_grad", "loss_spike", "grad_spike")
_REASON_TEXT = {
    "nonfinite_loss": "non-finite loss",
    "nonfinite_grad": "non-finite gradient",
    "loss_spike": "loss spike",
    "grad_spike": "grad-norm spike",
}
TRACKER_NAME = "guard_tracker.json"
_TRACKER_FORMAT = "seismo.guard.tracker/1"
_CKPT_FORMAT = "seismo.guard.checkpoint/1"
_SNAPSHOT_RE = re.compile(r"^guard-step(\d+)-e(\d+)\.pt$")
_STAT_KEYS = ("skipped_steps", "rollbacks", "skipped_batches", "recovered_spikes", "window_resets", "checkpoints",
              "disk_snapshots")
# per-step record: flags (4, REASONS order) | loss, grad_norm | their window medians | their z-scores
_N_FLAGS = len(REASONS)


class GuardGaveUp(RuntimeError):
    """The Guard stopped training: a spike did not go away after the allowed rollbacks (or, under
    the ``skip`` policy, did not recover at all). The message is the diagnosis; the attributes
    hold the same facts for programs."""

    def __init__(self, message: str, *, step: int, data_index: int, reasons: list[str],
                 rollbacks: list[dict], evidence: dict):
        super().__init__(message)
        self.step = step
        self.data_index = data_index
        self.reasons = reasons
        self.rollbacks = rollbacks
        self.evidence = evidence


class GuardWarning(RuntimeWarning):
    """Every skipped step, rollback, give-up and resume is reported with this warning category."""


@dataclass
class GuardConfig:
    """What the Guard watches and what it does. Defaults follow the OLMo-core / llm.c spike rule
    (6 sigma over 128 values, spikes kept out of the window) and a scaled-down PaLM rewind.

    Detection (per step, on the device): a signal ``x`` (the loss, the pre-clip global gradient
    norm) is a spike when at least ``warmup`` values have been accepted and
    ``(x - median) / max(1.4826 MAD, 1e-3 |median|) > z`` **and** ``x - median > min_jump |median|``
    over the last ``window`` accepted values. A non-finite loss or gradient is always skipped.
    """

    policy: str = "rollback"
    # detection
    window: int = 128
    z: float = 6.0
    warmup: int = 20
    loss_min_jump: float = 0.05
    grad_min_jump: float = 1.0
    watch_loss: bool = True
    watch_grad_norm: bool = True
    # escalation: when a spike "does not recover"
    max_consecutive_skips: int = 5
    recovery_steps: int = 20
    # rollback
    interval: int = 50  # steps between in-memory checkpoints
    ring_size: int = 4  # in-memory checkpoints kept
    disk_interval: int = 200  # steps between on-disk snapshots (a multiple of interval; 0 = never)
    disk_keep: int = 2  # on-disk snapshots kept
    rewind: int = 20  # restore a checkpoint at least this many steps before the spike started
    skip_ahead: int = 50  # batches skipped beyond the last one the failed trajectory saw
    rollback_lr_factor: float = 1.0  # multiply the effective LR by this at each rollback
    max_rollbacks: int = 3  # rollbacks allowed within retry_window batches; one more gives up
    retry_window: int = 1000  # in data batches
    # mechanics
    skip_mode: str = "auto"
    sync_every: int = 16  # steps between host reads of the decisions (device skip modes)
    max_grad_norm: float = 0.0  # > 0: clip to this norm, reusing the norm the Guard computed
    zero_grad: bool = True  # optimizer.zero_grad(set_to_none=True) after every step
    restore_rng: bool = True  # checkpoints carry the torch RNG state; a rollback restores it

    def validate(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"GuardConfig.{what}")

        need(self.policy in POLICIES, f"policy: must be one of {POLICIES}, got {self.policy!r}")
        need(self.skip_mode in SKIP_MODES, f"skip_mode: must be one of {SKIP_MODES}, got {self.skip_mode!r}")
        for f in ("window", "warmup", "max_consecutive_skips", "recovery_steps", "interval", "ring_size",
                  "disk_keep", "retry_window", "sync_every"):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{f}: must be an integer >= 1, got {v!r}")
        for f in ("disk_interval", "rewind", "skip_ahead", "max_rollbacks"):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"{f}: must be an integer >= 0, got {v!r}")
        need(self.window >= 4, f"window: must be >= 4, got {self.window}")
        need(self.warmup <= self.window, f"warmup: must be <= window ({self.window}), got {self.warmup}")
        need(self.z > 0 and math.isfinite(self.z), f"z: must be a positive number, got {self.z}")
        for f in ("loss_min_jump", "grad_min_jump", "max_grad_norm"):
            v = getattr(self, f)
            need(v >= 0 and math.isfinite(v), f"{f}: must be a finite number >= 0, got {v}")
        need(0 < self.rollback_lr_factor <= 1, f"rollback_lr_factor: must be in (0, 1], got {self.rollback_lr_factor}")
        need(self.disk_interval % self.interval == 0,
             f"disk_interval: must be a multiple of interval ({self.interval}), got {self.disk_interval}")


def data_index(step: int, skipped_ranges: Sequence[Sequence[int]]) -> int:
    """The data index a run trains on at ``step`` when the half-open index ranges
    ``skipped_ranges`` (sorted, disjoint) are jumped over: the step-th index in no range.

    A reference run that "never saw" those batches uses the same function from step 0.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    idx = step
    for a, b in skipped_ranges:
        if a > idx:
            break
        idx += b - a
    return idx


def _merge(ranges: list[list[int]], a: int, b: int) -> list[list[int]]:
    out: list[list[int]] = []
    for lo, hi in sorted([*ranges, [a, b]]):
        if hi <= lo:
            continue
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return out


# --- device-side spike window ---------------------------------------------------------------
class _SpikeWindow:
    """Median / MAD over the last ``window`` accepted (loss, grad norm) pairs, on the device.

    ``decide`` and ``accept`` are pure tensor code: no ``.item()``, no Python branch on data.
    Unfilled slots hold NaN and are ignored by ``nanmedian`` (the lower median for even counts).
    """

    def __init__(self, cfg: GuardConfig):
        self.size = cfg.window
        self.warmup = cfg.warmup
        self.z = cfg.z
        self.min_jump = (cfg.loss_min_jump, cfg.grad_min_jump)
        self.active = (cfg.watch_loss, cfg.watch_grad_norm)
        self.buf: Tensor | None = None
        self.count: Tensor | None = None
        self._consts: tuple[torch.device, Tensor, Tensor] | None = None

    def _ensure(self, device: torch.device) -> None:
        if self.buf is None:
            self.buf = torch.full((2, self.size), float("nan"), device=device)
            self.count = torch.zeros((), dtype=torch.long, device=device)
        elif self.buf.device != device:
            self.buf, self.count = self.buf.to(device), self.count.to(device)
        if self._consts is None or self._consts[0] != device:
            self._consts = (device, torch.tensor(self.min_jump, device=device), torch.tensor(self.active, device=device))

    def decide(self, vals: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``vals`` = (loss, grad norm), float32. Returns the flags (4,) float32 in REASONS order,
        the window medians (2,) and the robust z-scores (2,)."""
        self._ensure(vals.device)
        _, min_jump, active = self._consts
        med = torch.nanmedian(self.buf, dim=1).values
        mad = torch.nanmedian((self.buf - med[:, None]).abs(), dim=1).values
        scale = torch.maximum(MAD_TO_SIGMA * mad, 1e-3 * med.abs()).clamp_min(1e-12)
        dev = vals - med
        z = dev / scale
        spike = (self.count >= self.warmup) & active & (z > self.z) & (dev > min_jump * med.abs())
        flags = torch.cat([~torch.isfinite(vals), spike]).float()
        return flags, med, z

    def accept(self, ok: Tensor, vals: Tensor) -> None:
        """Append ``vals`` to the window where ``ok`` (a 0-d bool tensor); otherwise leave it."""
        pos = torch.remainder(self.count, self.size).reshape(1)
        cur = self.buf.index_select(1, pos).squeeze(1)
        self.buf.index_copy_(1, pos, torch.where(ok, vals, cur).unsqueeze(1))
        self.count += ok.long()

    def reset(self) -> None:
        """Forget every value (warm-up starts again)."""
        if self.buf is not None:
            self.buf.fill_(float("nan"))
            self.count.zero_()

    def state_dict(self) -> dict | None:
        if self.buf is None:
            return None
        return {"buf": self.buf.detach().to("cpu", copy=True), "count": self.count.detach().to("cpu", copy=True)}

    def load_state_dict(self, state: Mapping | None) -> None:
        if state is None:
            self.buf = self.count = None
            return
        if tuple(state["buf"].shape) != (2, self.size):
            raise ValueError(f"Guard window state has shape {tuple(state['buf'].shape)}, expected (2, {self.size})")
        device = self.buf.device if self.buf is not None else torch.device("cpu")
        self.buf = state["buf"].to(device, copy=True)
        self.count = state["count"].to(device, copy=True).long()


def _finite_or_str(x: Any) -> Any:
    return str(x) if isinstance(x, float) and not math.isfinite(x) else x


def _to_cpu(obj: Any) -> Any:
    """A deep copy with every tensor copied to the CPU (containers rebuilt, scalars shared)."""
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
    return copy.deepcopy(obj)


def _clone(obj: Any) -> Any:
    """A deep copy (devices kept) handed to ``load_state_dict``, which may keep references to
    the tensors it gets: a ring checkpoint must never become live optimizer state."""
    if isinstance(obj, Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone(v) for v in obj)
    return obj


def _list_snapshots(directory: Path) -> list[tuple[int, int, Path]]:
    """``(step, epoch, path)`` of every snapshot file in ``directory`` (tmp files are ignored)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    out = []
    for name in names:
        m = _SNAPSHOT_RE.match(name)
        if m:
            out.append((int(m.group(1)), int(m.group(2)), directory / name))
    return out


class _DiskWriter:
    """One daemon thread that writes snapshots in order and prunes old ones.

    The queue holds at most two pending snapshots (each is a ring entry already in memory); a
    third submission waits, so a slow disk slows training instead of growing memory. A failed
    write is reported once with :class:`GuardWarning`; rollbacks still use the in-memory ring.
    """

    def __init__(self, directory: Path, keep: int):
        self.dir = directory
        self.keep = keep
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.thread: threading.Thread | None = None
        self.failed = False
        self.written = 0

    def submit(self, path: Path, payload: dict) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="seismo-guard-writer", daemon=True)
            self.thread.start()
        self.q.put((path, payload))

    def drain(self) -> None:
        if self.thread is not None:
            self.q.join()

    def close(self) -> None:
        if self.thread is not None:
            self.q.put(None)
            self.thread.join()
            self.thread = None

    def _run(self) -> None:
        while True:
            item = self.q.get()
            try:
                if item is None:
                    return
                path, payload = item
                try:
                    atomic_torch_save(payload, path)
                    self.written += 1
                    self._prune()
                except Exception as exc:  # noqa: BLE001 - a full disk must not kill training
                    if not self.failed:
                        self.failed = True
                        warnings.warn(f"seismo Guard: writing snapshot {path} failed ({exc!r}); rollbacks still use "
                                      "the in-memory checkpoints, but a restarted job cannot resume from it", GuardWarning)
            finally:
                self.q.task_done()

    def _prune(self) -> None:
        files = sorted(_list_snapshots(self.dir))
        for _, _, p in files[: max(0, len(files) - self.keep)]:
            try:
                p.unlink()
            except OSError:
                pass


# --- the Guard ------------------------------------------------------------------------------------
class Guard:
    """Skip spiking steps and roll back past bad data. See the module docstring and docs/GUARD.md.

    Args:
        model: the model being trained (a DDP wrapper is fine; it is checkpointed as given).
        optimizer: its unchanged ``torch.optim`` optimizer. The Guard calls ``optimizer.step()``.
        config: a :class:`GuardConfig`; keyword ``overrides`` (``policy="skip"``, ``interval=100``,
            ...) replace its fields.
        ckpt_dir: directory for on-disk snapshots and the tracker (rank 0 writes it; all ranks
            read it on resume). ``None``: in-memory checkpoints only, no resume.
        store, run_id: a run store (path or ``RunStore``) and the run that receives ``guard_*`` events.
        monitor: a :class:`seismo.Monitor`; its store and run receive the events (takes precedence).
        stateful: ``{name: obj}`` with ``state_dict`` / ``load_state_dict`` (an LR scheduler, a
            data loader, an EMA) saved in every checkpoint and restored on rollback and resume.
        on_event: called with each list of new :class:`Event` (e.g. ``seismo.diagnose.AlertPrinter()``).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: GuardConfig | None = None,
        *,
        ckpt_dir: str | os.PathLike | None = None,
        store: Any = None,
        run_id: int | None = None,
        monitor: Any = None,
        stateful: Mapping[str, Any] | None = None,
        on_event: Callable[[list[Event]], None] | None = None,
        **overrides: Any,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Guard needs an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Guard needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        names = {f.name for f in dataclasses.fields(GuardConfig)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"Guard: unknown option(s) {unknown}; GuardConfig fields are {sorted(names)}")
        cfg = dataclasses.replace(config if config is not None else GuardConfig(), **overrides)
        cfg.validate()
        if store is not None and run_id is None:
            raise ValueError("Guard: store needs run_id (or pass monitor=... to use the Monitor's run)")
        self.config = cfg
        self.model = model
        self.optimizer = optimizer
        self.ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else None
        self.stateful = dict(stateful or {})
        for k, o in self.stateful.items():
            if not (hasattr(o, "state_dict") and hasattr(o, "load_state_dict")):
                raise TypeError(f"Guard: stateful[{k!r}] needs state_dict() and load_state_dict()")
        self.monitor = monitor
        self.on_event = on_event
        self._store_arg = store
        self._store = None
        self._run_id = run_id

        ddp = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size() if ddp else 1
        self.rank = dist.get_rank() if ddp else 0

        self._step = 0
        self._iteration = 0
        self._ranges: list[list[int]] = []
        self._rollbacks: list[dict] = []
        self._lr_factor = 1.0
        self._stats = dict.fromkeys(_STAT_KEYS, 0)
        self._window = _SpikeWindow(cfg)
        self._ring: deque[dict] = deque(maxlen=cfg.ring_size)
        self._pending: list[tuple[int, int, Tensor]] = []
        self._episode: dict | None = None
        self._mode: str | None = None
        self._mask: Any = None
        self._state_ready = False
        self._gave_up: GuardGaveUp | None = None
        self._checked_dir = False
        self._closed = False
        self._warned: set[str] = set()
        self.events: list[Event] = []
        self._writer: _DiskWriter | None = None
        if self.ckpt_dir is not None and self.rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            if cfg.policy == "rollback" and cfg.disk_interval > 0:
                self._writer = _DiskWriter(self.ckpt_dir, cfg.disk_keep)

    # --- public state ---------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """The training step the next :meth:`step` call completes; rewinds on a rollback. Use it
        for LR schedules. Skipped steps count (their batch is consumed, their update dropped)."""
        return self._step

    @property
    def data_index(self) -> int:
        """The data index of the current step: ``step_count`` with the skipped ranges jumped over."""
        return data_index(self._step, self._ranges)

    def data_index_at(self, step: int) -> int:
        """The data index of ``step`` under the current skipped ranges."""
        return data_index(step, self._ranges)

    @property
    def lr_factor(self) -> float:
        """Product of ``rollback_lr_factor`` over all rollbacks. The optimizer steps with each
        group's ``lr`` times this; the param groups keep what the loop or scheduler sets."""
        return self._lr_factor

    @property
    def skipped_ranges(self) -> list[tuple[int, int]]:
        """Merged half-open data-index ranges that are never trained on."""
        return [(a, b) for a, b in self._ranges]

    @property
    def rollbacks(self) -> list[dict]:
        """One record per rollback (as in the tracker file)."""
        return copy.deepcopy(self._rollbacks)

    @property
    def stats(self) -> dict[str, int]:
        """Counters: skipped_steps, rollbacks, skipped_batches, recovered_spikes, checkpoints,
        disk_snapshots, as of the last host read (at most ``sync_every`` steps old; see :meth:`flush`)."""
        out = dict(self._stats)
        out["disk_snapshots"] = self._writer.written if self._writer is not None else out["disk_snapshots"]
        return out

    @property
    def skip_mode(self) -> str:
        """The skip mechanism in use (resolved from ``"auto"`` at the first step)."""
        return self._mode or self.config.skip_mode

    @property
    def tracker_path(self) -> Path | None:
        return self.ckpt_dir / TRACKER_NAME if self.ckpt_dir is not None else None

    # --- the loop ----------------------------------------------------------------------------
    def steps(self, total_steps: int) -> Iterator[int]:
        """Yield the data index of every step until ``step_count`` reaches ``total_steps``. After
        a rollback ``step_count`` rewinds and the indices jump over the skipped range. Call
        :meth:`step` exactly once per iteration."""
        while True:
            while self._step < total_steps:
                self._boundary()
                it = self._iteration
                yield self.data_index
                if self._iteration == it:
                    raise RuntimeError("Guard.steps(): call guard.step(loss) once in every iteration")
            self.flush()  # the last decisions may still roll back
            if self._step >= total_steps:
                break
        if self._writer is not None:
            self._writer.drain()

    @torch.no_grad()
    def step(self, loss: Tensor | float, *, grad_norm: Tensor | float | None = None) -> Tensor:
        """Decide whether this step is applied, apply it (``optimizer.step()``) or not, and zero
        the gradients. Call it after ``loss.backward()`` (after the last micro-batch when
        accumulating gradients), instead of ``optimizer.step()``.

        ``loss`` is this rank's scalar loss; ``grad_norm`` the pre-clip global gradient norm if
        the loop already has it (otherwise the Guard computes it over the optimizer's params).
        Returns the decision as a 0-d bool tensor on the device (True = skipped), without a sync.
        """
        if self._gave_up is not None:
            raise self._gave_up
        if self._closed:
            raise RuntimeError("Guard.step() after close()")
        self._boundary()
        cfg = self.config
        opt = self.optimizer
        params = [p for g in opt.param_groups for p in g["params"]]
        with_grad = [p for p in params if p.grad is not None]
        loss_t = loss.detach() if isinstance(loss, Tensor) else torch.tensor(float(loss))
        if loss_t.numel() != 1:
            raise ValueError(f"Guard.step(loss): needs the scalar loss, got shape {tuple(loss_t.shape)}")
        device = with_grad[0].grad.device if with_grad else loss_t.device
        loss_t = loss_t.reshape(()).to(device=device, dtype=torch.float32, non_blocking=True)
        if grad_norm is None:
            gn = (torch.nn.utils.get_total_norm([p.grad for p in with_grad], 2.0, error_if_nonfinite=False)
                  if with_grad else torch.zeros((), device=device))
        else:
            gn = grad_norm.detach() if isinstance(grad_norm, Tensor) else torch.tensor(float(grad_norm))
        gn = gn.reshape(()).to(device=device, dtype=torch.float32, non_blocking=True)

        vals = torch.stack([loss_t, gn])
        flags, med, z = self._window.decide(vals)
        if self.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # every rank applies the same decision
        skip = flags.amax() > 0
        self._window.accept(~skip, vals)  # a skipped value never enters the window
        if cfg.max_grad_norm > 0 and with_grad:
            torch.nn.utils.clip_grads_with_norm_(with_grad, cfg.max_grad_norm, gn)

        if self._mode is None:
            self._mode = self._resolve_mode(device)
        urgent = False  # the host saw a skip: do the bookkeeping now
        if self._mode == "sync" or not self._state_initialised(with_grad, len(params)):
            urgent = bool(skip)
            if not urgent:
                self._optimizer_step()
        elif self._mode == "fused":
            opt.found_inf = skip.to(torch.float32)
            try:
                self._optimizer_step()
            finally:
                del opt.found_inf
        else:
            urgent = self._mask_step(skip, device)
        if cfg.zero_grad:
            opt.zero_grad(set_to_none=True)

        self._pending.append((self._step, self.data_index, torch.cat([flags, vals, med, z])))
        self._step += 1
        self._iteration += 1
        if urgent or self._step % cfg.sync_every == 0 or self._step % cfg.interval == 0:
            self.flush()
        self._boundary()
        return skip

    def flush(self) -> None:
        """Read the pending decisions (one host transfer): count and report skips, and roll back
        or give up if a spike did not recover. Called automatically every ``sync_every`` steps;
        call it between steps (never between a backward pass and :meth:`step`) to force one."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        rows = torch.stack([r for _, _, r in pending]).cpu().tolist()
        events: list[Event] = []
        trigger = None
        for (t, d, _), row in zip(pending, rows):
            hit = self._account(t, d, row, events, track=trigger is None)
            if hit is not None:
                trigger = hit
        self._emit(events)
        if trigger is not None:
            self._escalate(*trigger)

    def close(self) -> None:
        """Read the pending decisions, finish on-disk snapshots, write the tracker. Idempotent."""
        if self._closed:
            return
        try:
            if self._gave_up is None:
                self.flush()
        finally:
            self._closed = True
            if self._writer is not None:
                self._writer.close()
            if self._rollbacks or self._stats["skipped_steps"]:
                self._write_tracker(gave_up=str(self._gave_up) if self._gave_up is not None else None)
            if self._store is not None and self._store is not self._store_arg:
                self._store.close()

    def __enter__(self) -> "Guard":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    # --- resume / external checkpoints ------------------------------------------------------
    def resume(self, *, weights: bool = True) -> int:
        """Continue the job whose Guard wrote ``ckpt_dir``: reload the tracker (skipped ranges,
        LR factor, rollback history, counters) and, with ``weights``, the newest snapshot that is
        still valid (not from a trajectory a later rollback discarded) into the model, optimizer
        and ``stateful`` objects. Returns the step to continue from: 0 when there is no snapshot,
        in which case the model must be initialised as in the first job (same seed)."""
        if self.ckpt_dir is None:
            raise ValueError("Guard.resume(): needs ckpt_dir")
        self._checked_dir = True
        tracker = self._read_tracker()
        if tracker is not None:
            self._ranges = [[int(a), int(b)] for a, b in tracker["skipped_ranges"]]
            self._rollbacks = list(tracker["rollbacks"])
            self._lr_factor = float(tracker["lr_factor"])
            for k in _STAT_KEYS:
                self._stats[k] = int(tracker.get("stats", {}).get(k, 0))
        if self.rank == 0:  # temporary files of a writer that was killed
            for name in os.listdir(self.ckpt_dir):
                if name.startswith(".guard") and name.endswith(".tmp"):
                    try:
                        (self.ckpt_dir / name).unlink()
                    except OSError:
                        pass
        loaded = None
        if weights:
            for step, epoch, path in sorted(self._valid_snapshots(), reverse=True):
                try:
                    ck = torch.load(path, map_location="cpu", weights_only=True)
                except Exception as exc:  # noqa: BLE001 - fall back to an older snapshot
                    self._warn_once(f"bad:{path}", f"seismo Guard: cannot load {path} ({exc!r}); trying an older one")
                    continue
                self._restore(ck)
                self._ring.clear()
                self._ring.append(ck)
                loaded = path
                break
        if self.rank == 0 and (tracker is not None or loaded is not None):
            warnings.warn(
                f"seismo Guard: resumed at step {self._step} (data index {self.data_index}) from "
                f"{loaded.name if loaded else 'no snapshot'}; {len(self._rollbacks)} earlier rollback(s), "
                f"skipped ranges {self.skipped_ranges}, LR factor {self._lr_factor:g}", GuardWarning, stacklevel=2)
        return self._step

    def state_dict(self) -> dict:
        """The Guard's own state (not the model's), for loops that write their own checkpoints.
        Reads pending decisions first, so call it between steps."""
        self.flush()
        return {
            "step": self._step, "iteration": self._iteration, "skipped_ranges": [list(r) for r in self._ranges],
            "rollbacks": copy.deepcopy(self._rollbacks), "lr_factor": self._lr_factor, "stats": dict(self._stats),
            "window": self._window.state_dict(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Inverse of :meth:`state_dict` (the in-memory ring starts empty)."""
        self._step = int(state["step"])
        self._iteration = int(state.get("iteration", self._step))
        self._ranges = [[int(a), int(b)] for a, b in state["skipped_ranges"]]
        self._rollbacks = copy.deepcopy(list(state["rollbacks"]))
        self._lr_factor = float(state["lr_factor"])
        self._stats.update({k: int(v) for k, v in state.get("stats", {}).items() if k in self._stats})
        self._window.load_state_dict(state.get("window"))
        self._pending, self._episode = [], None
        self._ring.clear()
        self._checked_dir = True

    # --- internals: applying a step ---------------------------------------------------------
    def _resolve_mode(self, device: torch.device) -> str:
        mode = self.config.skip_mode
        opt = self.optimizer
        fused_ok = bool(getattr(opt, "_step_supports_amp_scaling", False)) and bool(opt.defaults.get("fused"))
        if mode == "fused" and not fused_ok:
            raise ValueError("Guard: skip_mode='fused' needs a torch optimizer built with fused=True "
                             "(Adam, AdamW, SGD); use 'mask' or 'sync'")
        if mode == "auto":
            mode = "fused" if fused_ok else ("sync" if device.type == "cpu" else "mask")
        return mode

    def _state_initialised(self, with_grad: list[Tensor], n_params: int) -> bool:
        """Whether every parameter about to be stepped already has optimizer state (the lazy
        first-step initialisation cannot be undone without the decision on the host)."""
        if self._state_ready:
            return True
        state = self.optimizer.state
        if len(state) >= n_params:
            self._state_ready = True
            return True
        return all(p in state and len(state[p]) > 0 for p in with_grad)

    def _optimizer_step(self) -> None:
        f = self._lr_factor
        if f == 1.0:
            self.optimizer.step()
            return
        groups = self.optimizer.param_groups
        base = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = g["lr"] * f
        try:
            self.optimizer.step()
        finally:
            for g, lr in zip(groups, base):
                g["lr"] = lr

    def _build_mask(self, device: torch.device) -> dict | str:
        live: list[Tensor] = []
        state = self.optimizer.state
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                st = state.get(p)
                if not st:
                    continue
                live.append(p)
                for k, v in st.items():
                    if not isinstance(v, Tensor):
                        return f"optimizer state {k!r} is a {type(v).__name__}, not a tensor"
                    live.append(v)
        for x in live:
            if x.device != device:
                return (f"a parameter or optimizer state tensor is on {x.device}, the decision on {device}; "
                        "for AdamW build it with capturable=True or fused=True")
        return {"live": live, "saved": [torch.empty_like(x) for x in live], "n_state": len(state)}

    def _mask_step(self, skip: Tensor, device: torch.device) -> bool:
        """Snapshot, step, select. Returns True if it fell back to the host and saw a skip."""
        m = self._mask
        if isinstance(m, dict) and m["n_state"] != len(self.optimizer.state):
            m = None
        if m is None:
            m = self._mask = self._build_mask(device)
        if isinstance(m, str):
            self._warn_once("mask", f"seismo Guard: skip_mode 'mask' cannot be exact here ({m}); "
                                    "deciding skips on the host instead (one sync per step)")
            self._mode = "sync"
            if bool(skip):
                return True
            self._optimizer_step()
            return False
        torch._foreach_copy_(m["saved"], m["live"])
        self._optimizer_step()
        for x, s in zip(m["live"], m["saved"]):
            torch.where(skip, s, x, out=x)
        return False

    # --- internals: bookkeeping ---------------------------------------------------------------
    def _account(self, t: int, d: int, row: list[float], events: list[Event], track: bool = True) -> tuple | None:
        """Count and report one step's decision. With ``track``, follow the spike episode and
        return ``(step, data index, row, episode)`` when it calls for escalation."""
        cfg = self.config
        reasons = [r for r, f in zip(REASONS, row[:_N_FLAGS]) if f > 0]
        if reasons:
            self._stats["skipped_steps"] += 1
            events.append(self._skip_event(t, d, reasons, row))
        if not track:
            return None
        ep = self._episode
        if not reasons:
            if ep is not None:
                ep["consecutive"] = 0
                if t - ep["last"] >= cfg.recovery_steps:
                    self._stats["recovered_spikes"] += 1
                    self._episode = None
            return None
        if ep is None:
            ep = self._episode = {"start": t, "data_index": d, "last": t, "consecutive": 0, "skips": 0,
                                  "reasons": [], "row": row, "first": {}}
        ep["consecutive"] += 1
        ep["skips"] += 1
        ep["last"] = t
        ep["reasons"] = sorted(set(ep["reasons"]) | set(reasons), key=REASONS.index)
        for r in reasons:
            ep["first"].setdefault(r, row)  # the numbers of each signal's first flagged step
        if ep["consecutive"] >= cfg.max_consecutive_skips or t - ep["start"] >= cfg.recovery_steps:
            return (t, d, row, dict(ep))
        return None

    def _skip_event(self, t: int, d: int, reasons: list[str], row: list[float]) -> Event:
        ev: dict[str, Any] = self._evidence(row)
        ev.update(data_index=d, reasons=reasons)
        return Event("guard_skip", "warning", t, "", f"skipped step {t} (data index {d}): {self._describe(reasons, row)}",
                     ev, "a lone skipped spike is harmless; repeated ones mean the run is unstable (see seismo diagnose)")

    def _escalate(self, t: int, d: int, row: list[float], ep: dict) -> None:
        """A spike did not recover. Skipping more cannot help: the cause is the parameter state,
        not a batch (skipped steps freeze the parameters). A lasting grad-norm-only excursion is
        accepted (Adam normalises the update; the loss is fine): the window restarts. A lasting
        loss excursion is rolled back (policy ``rollback``) or accepted (policy ``skip``). A lasting
        non-finite loss or gradient is rolled back or, under ``skip``, ends the run."""
        cfg = self.config
        how = (f"{ep['consecutive']} consecutive skipped steps" if ep["consecutive"] >= cfg.max_consecutive_skips
               else f"skips still coming {t - ep['start']} steps after the first")
        nonfinite = {"nonfinite_loss", "nonfinite_grad"} & set(ep["reasons"])
        if not set(ep["reasons"]) - {"grad_spike"}:
            self._reset_window(t, ep, how, "a lasting change of the gradient norm with a healthy loss is not a bad batch")
            return
        if cfg.policy == "skip":
            if not nonfinite:
                self._reset_window(t, ep, how, "policy 'skip' cannot undo a lasting loss excursion (policy='rollback' "
                                               "restores a checkpoint and skips the data)")
                return
            self._give_up(t, d, row, ep, f"the spike did not recover ({how}); policy 'skip' does not roll back "
                                         "(policy='rollback' restores a checkpoint and skips the data)")
        if self._writer is not None:
            self._writer.drain()  # no snapshot is being written or pruned while we pick one
        recent = [r for r in self._rollbacks if r["detected_data_index"] > d - cfg.retry_window]
        if len(recent) >= cfg.max_rollbacks:
            self._give_up(t, d, row, ep, f"the spike did not recover ({how}) after {len(recent)} rollback(s) within "
                                         f"{cfg.retry_window} batches (max_rollbacks={cfg.max_rollbacks})")
        ck = self._find_checkpoint(ep["start"] - cfg.rewind, ep["start"])
        if ck is None:
            self._give_up(t, d, row, ep, f"the spike did not recover ({how}) and no checkpoint from before step "
                                         f"{ep['start']} is left (ring_size={cfg.ring_size}, interval={cfg.interval})")
        self._rollback(t, d, ep, ck, how)

    def _reset_window(self, t: int, ep: dict, how: str, why: str) -> None:
        self._window.reset()
        self._episode = None
        self._stats["window_resets"] += 1
        msg = (f"{self._describe_episode(ep)} from step {ep['start']} (data index {ep['data_index']}) "
               f"did not recover ({how}); {why}: updates go on and the spike window restarts "
               f"(no detection for {self.config.warmup} steps)")
        ev: dict[str, Any] = {k: _finite_or_str(v) for k, v in self._evidence(ep["row"]).items()}
        ev.update(spike_step=ep["start"], spike_data_index=ep["data_index"], detected_step=t, reasons=list(ep["reasons"]),
                  skipped_steps=ep["skips"], why=how)
        self._emit([Event("guard_reset", "warning", t, "", msg, ev,
                          "watch the next steps; if the loss follows, lower the learning rate")])

    def _find_checkpoint(self, latest: int, spike_start: int) -> dict | None:
        """The newest checkpoint at or before step ``latest`` (ring first, then valid snapshots on
        disk); failing that, the oldest one at or before the spike, with a warning."""
        cands: list[tuple[int, Any]] = [(c["step"], c) for c in self._ring]
        ring_steps = {s for s, _ in cands}
        cands += [(s, p) for s, _, p in self._valid_snapshots() if s not in ring_steps]
        good = sorted((c for c in cands if c[0] <= latest), key=lambda c: -c[0])
        early = sorted((c for c in cands if latest < c[0] <= spike_start), key=lambda c: c[0])
        for i, (step, ck) in enumerate(good + early):
            if not isinstance(ck, dict):
                try:
                    ck = torch.load(ck, map_location="cpu", weights_only=True)
                except Exception as exc:  # noqa: BLE001 - try the next one
                    self._warn_once(f"bad:{ck}", f"seismo Guard: cannot load {ck} ({exc!r}); trying another checkpoint")
                    continue
            if i >= len(good):
                self._warn_once(f"rewind:{step}", f"seismo Guard: no checkpoint {self.config.rewind} steps before "
                                                  f"the spike at step {spike_start}; restoring step {step} instead")
            return ck
        return None

    def _rollback(self, t: int, d: int, ep: dict, ck: dict, how: str) -> None:
        cfg = self.config
        r = int(ck["step"])
        failed_at = self._step
        start, end = self.data_index_at(r), self.data_index_at(failed_at - 1) + 1 + cfg.skip_ahead
        self._ranges = _merge(self._ranges, start, end)
        self._lr_factor *= cfg.rollback_lr_factor
        if self._writer is not None:
            self._writer.drain()  # snapshots of the failed trajectory land before they are pruned
        self._restore(ck)
        while self._ring and self._ring[-1]["step"] > r:
            self._ring.pop()
        if not self._ring or self._ring[-1]["step"] != r:
            self._ring.append(ck)
        record = {
            "index": len(self._rollbacks), "spike_step": ep["start"], "spike_data_index": ep["data_index"],
            "detected_step": t, "detected_data_index": d, "failed_at_step": failed_at,
            "restored_step": r, "skipped_range": [start, end], "skipped_batches": end - start,
            "reasons": list(ep["reasons"]), "why": how, "lr_factor": self._lr_factor,
            "evidence": {k: _finite_or_str(v) for k, v in self._evidence(ep["row"]).items()},
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self._rollbacks.append(record)
        self._stats["rollbacks"] += 1
        self._stats["skipped_batches"] = sum(b - a for a, b in self._ranges)
        self._write_tracker()
        if self._writer is not None:
            for s, _, p in _list_snapshots(self.ckpt_dir):
                if s > r:  # from the discarded trajectory
                    try:
                        p.unlink()
                    except OSError:
                        pass
            if not any(s == r for s, _, _ in self._valid_snapshots()):
                self._writer.submit(self._snapshot_path(r, len(self._rollbacks)), ck)
        msg = (f"rolled back: {self._describe_episode(ep)} from step {ep['start']} (data index "
               f"{ep['data_index']}) did not recover ({how}); restored step {r}, skipping data [{start}, {end}) "
               f"({end - start} batches), LR factor {self._lr_factor:g}")
        ev = {k: v for k, v in record.items() if k != "time"}
        self._emit([Event("guard_rollback", "critical", t, "", msg, ev,
                          "if rollbacks repeat: lower the LR, add qk-layernorm / z-loss, or inspect the skipped data")])

    def _give_up(self, t: int, d: int, row: list[float], ep: dict, why: str) -> None:
        reasons = ep["reasons"]
        now = [r for r, f in zip(REASONS, row[:_N_FLAGS]) if f > 0]
        lines = [
            f"seismo Guard gave up at step {t} (data index {d}): {self._describe(now, row)}; the spike "
            f"started at step {ep['start']} (data index {ep['data_index']}) with {self._describe_episode(ep)}.",
            f"Why: {why}.",
        ]
        for rb in self._rollbacks:
            lines.append(f"  rollback #{rb['index'] + 1}: {', '.join(_REASON_TEXT[x] for x in rb['reasons'])} from step "
                         f"{rb['spike_step']} (data index {rb['spike_data_index']}) -> restored step {rb['restored_step']}, "
                         f"skipped data [{rb['skipped_range'][0]}, {rb['skipped_range'][1]}), LR factor {rb['lr_factor']:g}")
        lines.append(f"Rollbacks: {len(self._rollbacks)}. Next: lower the learning rate, add qk-layernorm / z-loss, "
                     "inspect the batches at the data indices above, or allow more rollbacks (max_rollbacks).")
        msg = "\n".join(lines)
        ev: dict[str, Any] = self._evidence(row)
        ev.update(data_index=d, reasons=list(reasons), rollbacks=len(self._rollbacks), why=why)
        exc = GuardGaveUp(msg, step=t, data_index=d, reasons=list(reasons), rollbacks=copy.deepcopy(self._rollbacks),
                          evidence=ev)
        self._gave_up = exc
        self._emit([Event("guard_gave_up", "critical", t, "", lines[0] + " " + lines[1], ev,
                          "lower the learning rate; see the diagnosis in the GuardGaveUp message")])
        self._write_tracker(gave_up=msg)
        if self._writer is not None:
            self._writer.drain()
        raise exc

    @staticmethod
    def _evidence(row: list[float]) -> dict[str, Any]:
        n = _N_FLAGS
        return {"loss": row[n], "grad_norm": row[n + 1], "loss_median": row[n + 2], "grad_norm_median": row[n + 3],
                "loss_z": row[n + 4], "grad_norm_z": row[n + 5]}

    @staticmethod
    def _describe_episode(ep: dict) -> str:
        return " and ".join(Guard._describe([r], ep["first"][r]) for r in ep["reasons"])

    @staticmethod
    def _describe(reasons: Sequence[str], row: list[float]) -> str:
        e = Guard._evidence(row)
        parts = []
        for r in reasons:
            if r == "nonfinite_loss":
                parts.append(f"non-finite loss ({e['loss']})")
            elif r == "nonfinite_grad":
                parts.append(f"non-finite gradient (norm {e['grad_norm']})")
            elif r == "loss_spike":
                parts.append(f"loss spike (loss {e['loss']:.4g} vs window median {e['loss_median']:.4g}, "
                             f"robust z {e['loss_z']:.3g})")
            elif r == "grad_spike":
                parts.append(f"grad-norm spike (norm {e['grad_norm']:.4g} vs window median "
                             f"{e['grad_norm_median']:.4g}, robust z {e['grad_norm_z']:.3g})")
        return " and ".join(parts) or "no spike"

    def _emit(self, events: list[Event]) -> None:
        if not events:
            return
        self.events.extend(events)
        if self.rank != 0:
            return
        for e in events:
            warnings.warn(f"seismo Guard: {e.message}", GuardWarning, stacklevel=4)
        dicts = [e.to_dict() for e in events]
        try:
            if self.monitor is not None:
                self.monitor.events_sink(dicts)
                self.monitor.events.extend(events)
            elif self._store_arg is not None:
                if self._store is None:
                    from seismo.store import RunStore

                    arg = self._store_arg
                    self._store = arg if isinstance(arg, RunStore) else RunStore(arg)
                self._store.log_events(int(self._run_id), dicts)
        except Exception as exc:  # noqa: BLE001 - reporting must not stop training
            self._warn_once("store", f"seismo Guard: could not write events to the run store ({exc!r})")
        if self.on_event is not None:
            self.on_event(events)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned and self.rank == 0:
            self._warned.add(key)
            warnings.warn(message, GuardWarning, stacklevel=3)

    # --- internals: checkpoints ---------------------------------------------------------------
    def _boundary(self) -> None:
        """At a step boundary: take the in-memory checkpoint (and queue the disk snapshot) if due.
        Never while a spike episode is open or decisions are unread."""
        if not self._checked_dir:
            self._check_dir()
        cfg = self.config
        t = self._step
        if cfg.policy != "rollback" or t % cfg.interval or self._episode is not None or self._pending:
            return
        if self._ring and self._ring[-1]["step"] == t:
            return
        payload = self._capture()
        self._ring.append(payload)
        self._stats["checkpoints"] += 1
        if self._writer is not None and cfg.disk_interval and t % cfg.disk_interval == 0:
            self._writer.submit(self._snapshot_path(t, len(self._rollbacks)), payload)

    def _capture(self) -> dict:
        rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": _CKPT_FORMAT,
            "step": self._step,
            "epoch": len(self._rollbacks),
            "model": _to_cpu(self.model.state_dict()),
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "stateful": {k: _to_cpu(o.state_dict()) for k, o in self.stateful.items()},
            "window": self._window.state_dict(),
            "rng": rng,
        }

    def _restore(self, ck: Mapping) -> None:
        if ck.get("format") != _CKPT_FORMAT:
            raise ValueError(f"not a seismo Guard checkpoint (format {ck.get('format')!r})")
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(_clone(ck["optimizer"]))
        for k, o in self.stateful.items():
            if k in ck["stateful"]:
                o.load_state_dict(_clone(ck["stateful"][k]))
            else:
                self._warn_once(f"stateful:{k}", f"seismo Guard: the checkpoint has no state for stateful[{k!r}]")
        self._window.load_state_dict(ck["window"])
        if self.config.restore_rng:
            torch.set_rng_state(ck["rng"]["cpu"])
            if "cuda" in ck["rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
        self._step = int(ck["step"])
        self.optimizer.zero_grad(set_to_none=True)
        self._pending = []
        self._episode = None
        self._mask = None
        self._state_ready = False

    def _snapshot_path(self, step: int, epoch: int) -> Path:
        return self.ckpt_dir / f"guard-step{step:09d}-e{epoch}.pt"

    def _valid_snapshots(self) -> list[tuple[int, int, Path]]:
        """Snapshots no later rollback discarded: one taken at step s after e rollbacks (epoch e)
        is valid iff every rollback since restored a step >= s."""
        if self.ckpt_dir is None:
            return []
        return [(s, e, p) for s, e, p in _list_snapshots(self.ckpt_dir)
                if all(rb["restored_step"] >= s for rb in self._rollbacks[e:])]

    def _check_dir(self) -> None:
        self._checked_dir = True
        if self.ckpt_dir is None:
            return
        if (self.ckpt_dir / TRACKER_NAME).exists() or _list_snapshots(self.ckpt_dir):
            raise FileExistsError(
                f"Guard: {self.ckpt_dir} holds a tracker or snapshots of an earlier run; call guard.resume() "
                "before training to continue it, or use an empty ckpt_dir")

    def _read_tracker(self) -> dict | None:
        path = self.ckpt_dir / TRACKER_NAME
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        if data.get("format") != _TRACKER_FORMAT:
            raise ValueError(f"{path}: not a seismo Guard tracker (format {data.get('format')!r})")
        return data

    def _write_tracker(self, gave_up: str | None = None) -> None:
        if self.ckpt_dir is None or self.rank != 0:
            return
        data = {
            "format": _TRACKER_FORMAT,
            "policy": self.config.policy,
            "lr_factor": self._lr_factor,
            "skipped_ranges": [list(r) for r in self._ranges],
            "rollbacks": self._rollbacks,
            "stats": self.stats,
            "gave_up": gave_up,
            "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_json(self.ckpt_dir / TRACKER_NAME, data)
