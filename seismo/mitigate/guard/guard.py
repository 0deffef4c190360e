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
  spike (robust z-score over the last ``window`` accepted values, :class:`SpikeWindow`), changes
  nothing: no parameter update, no moment update, no optimizer step-counter advance, no weight
  decay (how, without a host sync: :mod:`seismo.mitigate.guard.skip`). The spike never enters
  the window.
* ``"rollback"``: skip as above; when a spike does not recover (``max_consecutive_skips``
  consecutive skipped steps, or a third burst of skips ``recovery_steps`` or more after the first one),
  restore a checkpoint taken at least ``rewind`` steps before the spike started, skip every
  batch the failed trajectory saw plus ``skip_ahead`` more, optionally lower the LR, and go on.
  This is PaLM's remedy (Chowdhery et al. 2022, arXiv 2204.02311: "re-started training from a
  checkpoint roughly 100 steps before the spike started, and skipped roughly 200-500 data
  batches"; discussed by Molybog et al. 2023, arXiv 2304.09871). After ``max_rollbacks``
  rollbacks within ``retry_window`` batches the Guard raises :class:`GuardGaveUp`.

Bookkeeping (counters, events, the rollback decision) reads the per-step records once every
``sync_every`` steps and at checkpoint steps; a skipped step changes nothing, so deciding a
rollback a few steps late only costs those steps. Checkpoints, snapshots on disk and the tracker
that makes a restarted job repeat the failed one: :mod:`seismo.mitigate.guard.snapshots`.

Reports: ``guard.events``, the ``seismo.guard`` logger, event sinks (``sinks=[...]``), a Monitor's
run or a run store. ``warnings`` (:class:`GuardWarning`) only for once-per-run conditions.

DDP: every rank computes its flags, the flags are all-reduced with MAX before they are applied,
so all ranks skip together and roll back together; only rank 0 writes files and reports.
FSDP2 / tensor parallel (DTensor parameters): the same decisions; checkpoints go through
``torch.distributed.checkpoint`` (:mod:`seismo.mitigate.guard.sharded`), every rank keeping and
writing its own shards. FSDP1 is refused under the rollback policy.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.amp.grad_scaler import OptState

from seismo._wrappers import unwrap_model, unwrap_optimizer
from seismo.errors import ConfigError
from seismo.events import Event, EventSink
from seismo.mitigate.guard import messages, sharded, snapshots
from seismo.mitigate.guard.config import GuardConfig
from seismo.mitigate.guard.data_ranges import data_index, merge_range
from seismo.mitigate.guard.errors import GuardGaveUp, GuardResumeError
from seismo.mitigate.guard.reporting import EventFanout, logger
from seismo.mitigate.guard.skip import SkipStepper
from seismo.mitigate.guard.window import SpikeWindow

__all__ = ["Guard"]

_STAT_KEYS = ("skipped_steps", "rollbacks", "skipped_batches", "recovered_spikes", "window_resets", "checkpoints",
              "disk_snapshots")


class Guard:
    """Skip spiking steps and roll back past bad data. See the module docstring and docs/GUARD.md.

    Args:
        model: the model being trained; DDP, ``torch.compile`` and other wrappers are unwrapped
            (checkpoints hold the inner model's ``state_dict``, so they load with or without DDP).
            A model with DTensor parameters (FSDP2's ``fully_shard``, tensor parallel) is
            checkpointed through ``torch.distributed.checkpoint``, sharded (docs/GUARD.md).
        optimizer: its unchanged ``torch.optim`` optimizer, or a wrapper of one (Accelerate's
            ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``); the Guard calls the inner
            optimizer's ``step()``. ``ZeroRedundancyOptimizer`` works as it is.
        config: a :class:`GuardConfig`; keyword ``overrides`` (``policy="skip"``, ``interval=100``,
            ...) replace its fields.
        ckpt_dir: directory for on-disk snapshots and the tracker (rank 0 writes it; all ranks
            read it on resume). It must be writable (ConfigError otherwise). ``None``: in-memory
            checkpoints only, no resume (said once, with a warning, under the rollback policy).
        sinks: event sinks (``write_events(events)``, see :mod:`seismo.events`) that receive every
            ``guard_*`` event; flushed (not closed) by :meth:`close`.
        store, run_id: a run store (path or ``RunStore``) and the run that receives the events.
        monitor: a :class:`seismo.Monitor`; its run receives the events (takes precedence over store).
        stateful: ``{name: obj}`` with ``state_dict`` / ``load_state_dict`` (an LR scheduler, a
            data loader, an EMA) saved in every checkpoint and restored on rollback and resume.
        on_event: called with each list of new :class:`Event` (like a sink).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        config: GuardConfig | None = None,
        *,
        ckpt_dir: str | os.PathLike | None = None,
        sinks: Sequence[EventSink] = (),
        store: Any = None,
        run_id: int | None = None,
        monitor: Any = None,
        stateful: Mapping[str, Any] | None = None,
        on_event: Callable[[list[Event]], None] | None = None,
        scaler: Any = None,
        **overrides: Any,
    ):
        names = {f.name for f in dataclasses.fields(GuardConfig)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"Guard: unknown option(s) {unknown}; GuardConfig fields are {sorted(names)}")
        cfg = dataclasses.replace(config if config is not None else GuardConfig(), **overrides)
        self.config = cfg
        self.model = unwrap_model(model)
        self.optimizer = unwrap_optimizer(optimizer)
        _check_wrappers(model, optimizer, cfg)
        self.stateful = dict(stateful or {})
        for k, o in self.stateful.items():
            if not (hasattr(o, "state_dict") and hasattr(o, "load_state_dict")):
                raise ConfigError(f"stateful[{k!r}]: needs state_dict() and load_state_dict(), got {type(o).__name__}")
        ddp = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size() if ddp else 1
        self.rank = dist.get_rank() if ddp else 0
        self.monitor = monitor
        # fp16: the loop's torch.amp.GradScaler; the Guard unscales, and a step the scaler finds inf/nan
        # in is skipped as the scaler would (not a spike: the window never sees it), then scaler.update()
        self.scaler = scaler
        self._report = EventFanout(rank=self.rank, sinks=sinks, monitor=monitor, store=store, run_id=run_id,
                                   on_event=on_event)
        self._skipper = SkipStepper(self.optimizer, cfg.skip_mode, lambda: self._lr_factor, self._report.warn_once)
        # ZeroRedundancyOptimizer: its full state_dict() is a collective; each rank checkpoints its own shard
        self._opt_state = getattr(self.optimizer, "optim", self.optimizer) if _is_zero(self.optimizer) else self.optimizer

        self.ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else None
        if self.ckpt_dir is not None and self._opt_state is not self.optimizer and self.world_size > 1:
            raise ConfigError("ckpt_dir: snapshots of a ZeroRedundancyOptimizer on several ranks would hold only rank 0's "
                              "shard; use ckpt_dir=None (each rank keeps its shard in the in-memory ring)")
        # DTensor parameters (FSDP2, tensor parallel): checkpoints through torch.distributed.checkpoint (sharded.py);
        # every rank then writes its shards of each snapshot, synchronously, and rank 0 renames the directory
        self._sharded = sharded.is_sharded(self.model)
        self._disk = self.ckpt_dir is not None and self.rank == 0  # False after a write failed: memory only
        self._writer: snapshots.SnapshotWriter | sharded.ShardedSnapshotWriter | None = None
        if self.ckpt_dir is not None:
            self._prepare_ckpt_dir()
        if self._disk and cfg.policy == "rollback" and cfg.disk_interval > 0 and not self._sharded:
            self._writer = snapshots.SnapshotWriter(self.ckpt_dir, cfg.disk_keep)
        if self._sharded and self.ckpt_dir is not None and cfg.policy == "rollback" and cfg.disk_interval > 0:
            self._writer = sharded.ShardedSnapshotWriter(self.ckpt_dir, cfg.disk_keep, self.model, self._opt_state,
                                                         self.rank, snapshots.list_snapshots)
        if self.ckpt_dir is None and cfg.policy == "rollback":
            self._report.warn_once("memory", "seismo Guard: ckpt_dir=None: rollback checkpoints are kept in memory "
                                             "only; a restarted job cannot resume (pass ckpt_dir=... to keep them)")

        self._step = 0
        self._iteration = 0
        self._ranges: list[list[int]] = []
        self._rollbacks: list[dict] = []
        self._lr_factor = 1.0
        self._stats = dict.fromkeys(_STAT_KEYS, 0)
        self._window = SpikeWindow(cfg)
        self._ring: deque[dict] = deque(maxlen=cfg.ring_size)
        self._pending: list[tuple[int, int, Tensor]] = []
        self._episode: dict | None = None
        self._gave_up: GuardGaveUp | None = None
        self._checked_dir = False
        self._closed = False

    # --- public state ---------------------------------------------------------------------
    @property
    def events(self) -> list[Event]:
        """Every event this Guard emitted, oldest first (on every rank)."""
        return self._report.events

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
        """Counters: skipped_steps, rollbacks, skipped_batches, recovered_spikes, window_resets,
        checkpoints, disk_snapshots, as of the last host read (at most ``sync_every`` steps old)."""
        out = dict(self._stats)
        if self._writer is not None:
            out["disk_snapshots"] = self._writer.written
        return out

    @property
    def skip_mode(self) -> str:
        """The skip mechanism in use (resolved from ``"auto"`` at the first step)."""
        return self._skipper.mode or self.config.skip_mode

    @property
    def in_memory_only(self) -> bool:
        """True when no snapshot or tracker goes to disk (``ckpt_dir=None``, or a write failed)."""
        return not self._disk

    @property
    def tracker_path(self) -> Path | None:
        return self.ckpt_dir / snapshots.TRACKER_NAME if self.ckpt_dir is not None else None

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
            self._check_disk()

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
        overflow = self._unscale(opt)  # None without an (enabled) GradScaler
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
        if hasattr(gn, "full_tensor"):  # a DTensor (FSDP2, tensor parallel): the norm of the full gradient
            gn = gn.full_tensor()
        gn = gn.reshape(()).to(device=device, dtype=torch.float32, non_blocking=True)

        vals = torch.stack([loss_t, gn])
        flags, med, z = self._window.decide(vals)
        if overflow is not None:
            overflow = overflow.to(device, non_blocking=True)  # the scaler's inf/nan skip is not the Guard's: no flag, no spike
            flags = flags * (~overflow).float()
        if self.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # every rank applies the same decision
        skip = flags.amax() > 0
        self._window.accept(~skip if overflow is None else ~(skip | overflow), vals)  # a skipped value never enters the window
        if cfg.max_grad_norm > 0 and with_grad:
            torch.nn.utils.clip_grads_with_norm_(with_grad, cfg.max_grad_norm, gn)
        urgent = self._skipper.apply(skip if overflow is None else skip | overflow, with_grad, len(params), device)
        if overflow is not None:
            self.scaler.update()  # backs the scale off after an overflow, grows it after growth_interval clean steps
        if cfg.zero_grad:
            opt.zero_grad(set_to_none=True)

        self._pending.append((self._step, self.data_index, torch.cat([flags, vals, med, z])))
        self._step += 1
        self._iteration += 1
        if urgent or self._step % cfg.sync_every == 0 or self._step % cfg.interval == 0:
            self.flush()
        self._boundary()
        return skip

    def _unscale(self, opt: torch.optim.Optimizer) -> Tensor | None:
        """With an enabled GradScaler: unscale the gradients (unless the loop did) and return the
        scaler's found-inf flag as a 0-d bool tensor (no host sync); None otherwise."""
        scaler = self.scaler
        if scaler is None or not scaler.is_enabled():
            return None
        if scaler._per_optimizer_states[id(opt)]["stage"] is not OptState.UNSCALED:
            scaler.unscale_(opt)
        found = scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values()
        found = [f.reshape(()).float() for f in found]
        return torch.stack([f.to(found[0].device, non_blocking=True) for f in found]).sum() > 0

    def flush(self) -> None:
        """Read the pending decisions (one host transfer): count and report skips, and roll back
        or give up if a spike did not recover. Called automatically every ``sync_every`` steps;
        call it between steps (never between a backward pass and :meth:`step`) to force one."""
        self._check_disk()
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        rows = torch.stack([r for _, _, r in pending]).cpu().tolist()
        events: list[Event] = []
        trigger = None
        for (t, d, _), row in zip(pending, rows):
            if messages.reasons_of(row):
                self._stats["skipped_steps"] += 1
                events.append(messages.skip_event(t, d, row))
            hit = self._follow_episode(t, d, row) if trigger is None else None
            if hit is not None:
                trigger = hit
        self._report.emit(events)
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
                self._check_disk()
            if self._rollbacks or self._stats["skipped_steps"]:
                self._write_tracker(gave_up=str(self._gave_up) if self._gave_up is not None else None)
            self._report.close()

    def __enter__(self) -> "Guard":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    # --- resume / external checkpoints ------------------------------------------------------
    def resume(self, *, weights: bool = True, fresh_if_unreadable: bool = False) -> int:
        """Continue the job whose Guard wrote ``ckpt_dir``: reload the tracker (skipped ranges,
        LR factor, rollback history, counters) and, with ``weights``, the newest snapshot that is
        still valid (not from a trajectory a later rollback discarded) into the model, optimizer
        and ``stateful`` objects. Returns the step to continue from: 0 when there is no snapshot,
        in which case the model must be initialised as in the first job (same seed).

        An unreadable tracker, or snapshots of which none loads, raise :class:`GuardResumeError`
        and change nothing: restarting from step 0 would silently throw the run away. With
        ``fresh_if_unreadable=True`` those files are renamed to ``*.unreadable`` and the run starts
        from step 0 (keeping the skipped data ranges of a readable tracker).
        """
        if self.ckpt_dir is None:
            raise ConfigError("ckpt_dir: Guard.resume() needs the ckpt_dir of the job to continue")
        fresh_hint = ("nothing was changed; fix or remove the file(s), or call guard.resume(fresh_if_unreadable=True) "
                      "to move them aside and start from step 0")
        try:
            tracker = snapshots.read_tracker(self.ckpt_dir)
        except GuardResumeError as exc:
            if not fresh_if_unreadable:
                raise GuardResumeError(f"seismo Guard: {exc}; {fresh_hint}") from None
            self._set_aside([self.ckpt_dir / snapshots.TRACKER_NAME, *(p for _, _, p in self._valid_snapshots())], exc)
            self._checked_dir = True
            return self._step
        if tracker is not None:
            self._ranges = [[int(a), int(b)] for a, b in tracker["skipped_ranges"]]
            self._rollbacks = list(tracker["rollbacks"])
            self._lr_factor = float(tracker["lr_factor"])
            for k in _STAT_KEYS:
                self._stats[k] = int(tracker.get("stats", {}).get(k, 0))
        if self.rank == 0:
            snapshots.remove_temporary_files(self.ckpt_dir)
        loaded, unreadable = None, []
        if weights:
            for _, _, path in sorted(self._valid_snapshots(), reverse=True):
                try:
                    ck = self._load_snapshot(path)
                except Exception as exc:  # noqa: BLE001 - any damage: fall back to an older snapshot, reported
                    unreadable.append((path, exc))
                    self._report.warn_once(f"bad:{path}", f"seismo Guard: cannot load {path} "
                                                          f"({snapshots.load_error_text(exc)}); "
                                                          "trying an older one")
                    continue
                self._restore(ck)
                self._ring.clear()
                self._ring.append(ck)
                loaded = path
                break
        if unreadable and loaded is None:
            path, exc = unreadable[0]
            what = (f"none of the {len(unreadable)} snapshot(s) in {self.ckpt_dir} can be loaded "
                    f"(newest: {path.name}: {snapshots.load_error_text(exc)})")
            if not fresh_if_unreadable:
                raise GuardResumeError(f"seismo Guard: {what}; {fresh_hint}")
            self._set_aside([p for p, _ in unreadable], what)
        self._checked_dir = True  # a failed resume leaves the directory guarded: training cannot start over on it
        if self.rank == 0 and (tracker is not None or loaded is not None):
            logger.warning("seismo Guard: resumed at step %d (data index %d) from %s; %d earlier rollback(s), skipped "
                           "ranges %s, LR factor %g", self._step, self.data_index, loaded.name if loaded else "step 0",
                           len(self._rollbacks), self.skipped_ranges, self._lr_factor)
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

    def _prepare_ckpt_dir(self) -> None:
        """Rank 0 creates and probes ``ckpt_dir``; with several ranks the outcome is broadcast, so a
        ConfigError is raised on every rank (the others would otherwise wait in the first collective)."""
        why = None
        if self.rank == 0:
            try:
                snapshots.prepare_dir(self.ckpt_dir)
            except ConfigError as e:
                why = str(e)
        if self.world_size > 1:
            box = [why]
            dist.broadcast_object_list(box, src=0)
            why = box[0]
        if why is not None:
            raise ConfigError(why if self.rank == 0 else f"{why} (on rank 0)")

    # --- internals: spike episodes and what they lead to ------------------------------------
    def _follow_episode(self, t: int, d: int, row: list[float]) -> tuple | None:
        """Follow the spike episode through one step's decision; return ``(step, data index, row,
        episode)`` when it calls for escalation."""
        cfg = self.config
        reasons = messages.reasons_of(row)
        ep = self._episode
        if not reasons:
            if ep is not None:
                ep["consecutive"] = 0
                if t - ep["last"] >= cfg.recovery_steps:
                    self._stats["recovered_spikes"] += 1
                    self._episode = None
            return None
        if ep is None:
            ep = self._episode = {"start": t, "data_index": d, "last": t, "consecutive": 0, "skips": 0, "bursts": 0,
                                  "reasons": [], "row": row, "first": {}}
        if ep["consecutive"] == 0:  # the step before was clean (or this opens the episode): a new burst
            ep["bursts"] += 1
        ep["consecutive"] += 1
        ep["skips"] += 1
        ep["last"] = t
        ep["reasons"] = sorted(set(ep["reasons"]) | set(reasons), key=messages.REASONS.index)
        for r in reasons:
            ep["first"].setdefault(r, row)  # the numbers of each signal's first flagged step
        # lasting: flagged steps in a row, or a spike that keeps coming back (a third burst of flagged steps
        # recovery_steps or more after the first); two isolated outliers are two skips, never an escalation
        if ep["consecutive"] >= cfg.max_consecutive_skips or (t - ep["start"] >= cfg.recovery_steps and ep["bursts"] >= 3):
            return (t, d, row, dict(ep))
        return None

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
            return self._reset_window(t, ep, how, "a lasting change of the gradient norm with a healthy loss is not a "
                                                  "bad batch")
        if cfg.policy == "skip":
            if not nonfinite:
                return self._reset_window(t, ep, how, "policy 'skip' cannot undo a lasting loss excursion "
                                                      "(policy='rollback' restores a checkpoint and skips the data)")
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
        self._report.emit([messages.reset_event(t, ep, how, why, self.config.warmup)])

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
                    ck = self._load_snapshot(ck)
                except Exception as exc:  # noqa: BLE001 - any damage: try the next one, reported
                    self._report.warn_once(f"bad:{ck}", f"seismo Guard: cannot load {ck} "
                                                        f"({snapshots.load_error_text(exc)}); trying another checkpoint")
                    continue
            if i >= len(good):
                self._report.warn_once(f"rewind:{step}", f"seismo Guard: no checkpoint {self.config.rewind} steps "
                                                         f"before the spike at step {spike_start}; restoring step {step}")
            return ck
        return None

    def _rollback(self, t: int, d: int, ep: dict, ck: dict, how: str) -> None:
        cfg = self.config
        r = int(ck["step"])
        failed_at = self._step
        start, end = self.data_index_at(r), self.data_index_at(failed_at - 1) + 1 + cfg.skip_ahead
        self._ranges = merge_range(self._ranges, start, end)
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
            "evidence": {k: messages.finite_or_str(v) for k, v in messages.evidence(ep["row"]).items()},
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self._rollbacks.append(record)
        self._stats["rollbacks"] += 1
        self._stats["skipped_batches"] = sum(b - a for a, b in self._ranges)
        self._write_tracker()
        self._check_disk()
        if self._writer is not None and (self._disk or self._sharded):
            for s, _, p in snapshots.list_snapshots(self.ckpt_dir) if self._disk else ():
                if s > r:  # from the discarded trajectory
                    try:
                        sharded.remove(p)
                    except OSError as exc:
                        logger.debug("seismo Guard: could not delete %s (%r); it is invalid by its epoch", p, exc)
            if not any(s == r for s, _, _ in self._valid_snapshots()):
                self._writer.submit(self._snapshot_path(r, len(self._rollbacks)), ck)
        self._report.emit([messages.rollback_event(t, ep, record)])

    def _give_up(self, t: int, d: int, row: list[float], ep: dict, why: str) -> None:
        lines = messages.gave_up_text(t, d, row, ep, why, self._rollbacks)
        msg = "\n".join(lines)
        ev: dict[str, Any] = messages.evidence(row)
        ev.update(data_index=d, reasons=list(ep["reasons"]), rollbacks=len(self._rollbacks), why=why)
        exc = GuardGaveUp(msg, step=t, data_index=d, reasons=list(ep["reasons"]),
                          rollbacks=copy.deepcopy(self._rollbacks), evidence=ev)
        self._gave_up = exc
        self._report.emit([messages.gave_up_event(t, lines, ev)])
        self._write_tracker(gave_up=msg)
        if self._writer is not None:
            self._writer.drain()
        raise exc

    # --- internals: checkpoints and files ---------------------------------------------------
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
        capture = sharded.capture if self._sharded else snapshots.capture
        payload = capture(t, len(self._rollbacks), self.model, self._opt_state, self.stateful, self._window)
        self._ring.append(payload)
        self._stats["checkpoints"] += 1
        if (self._disk or self._sharded) and self._writer is not None and cfg.disk_interval and t % cfg.disk_interval == 0:
            self._writer.submit(self._snapshot_path(t, len(self._rollbacks)), payload)

    def _snapshot_path(self, step: int, epoch: int) -> Path:
        return snapshots.snapshot_path(self.ckpt_dir, step, epoch, sharded=self._sharded)

    def _load_snapshot(self, path: Path) -> dict:
        """A snapshot from disk: a ``.pt`` file, or (sharded model) a DCP directory, loaded by every rank."""
        if self._sharded:
            if path.suffix != sharded.DCP_SUFFIX:
                raise ValueError(f"{path.name} is a snapshot of an unsharded model; this model is sharded")
            return sharded.load_dir(path, self.model, self._opt_state, self.rank)
        if path.is_dir():
            raise ValueError(f"{path.name} is a snapshot of a sharded model; this model is not sharded")
        return snapshots.load_snapshot(path)

    def _restore(self, ck: Mapping) -> None:
        restore = sharded.restore if ck.get("sharded") else snapshots.restore
        self._step = restore(ck, self.model, self._opt_state, self.stateful, self._window,
                             restore_rng=self.config.restore_rng, warn=self._report.warn_once)
        self.optimizer.zero_grad(set_to_none=True)
        self._pending = []
        self._episode = None
        self._skipper.reset()

    def _valid_snapshots(self) -> list[tuple[int, int, Path]]:
        """Snapshots no later rollback discarded: one taken at step s after e rollbacks (epoch e)
        is valid iff every rollback since restored a step >= s."""
        if self.ckpt_dir is None:
            return []
        return [(s, e, p) for s, e, p in snapshots.list_snapshots(self.ckpt_dir)
                if all(rb["restored_step"] >= s for rb in self._rollbacks[e:])]

    def _check_dir(self) -> None:
        self._checked_dir = True
        if self.ckpt_dir is None:
            return
        if (self.ckpt_dir / snapshots.TRACKER_NAME).exists() or snapshots.list_snapshots(self.ckpt_dir):
            raise FileExistsError(
                f"Guard: {self.ckpt_dir} holds a tracker or snapshots of an earlier run; call guard.resume() "
                "before training to continue it, or use an empty ckpt_dir")

    def _check_disk(self) -> None:
        """A snapshot write failed in the writer thread: stop using the disk (said once)."""
        if self._writer is not None and self._writer.error is not None and self._disk:
            path, exc = self._writer.error
            self._disk_failed(f"snapshot {path.name}", exc)

    def _disk_failed(self, what: str, exc: BaseException) -> None:
        self._disk = False
        self._report.warn_once("disk", f"seismo Guard: writing {what} to {self.ckpt_dir} failed ({exc!r}); going on with "
                                       "in-memory checkpoints only: rollbacks still work, but the files on disk stay "
                                       "as they were before this failure, so a restarted job resumes from there")

    def _write_tracker(self, gave_up: str | None = None) -> None:
        if not self._disk:
            return
        data = {
            "format": snapshots.TRACKER_FORMAT,
            "policy": self.config.policy,
            "lr_factor": self._lr_factor,
            "skipped_ranges": [list(r) for r in self._ranges],
            "rollbacks": self._rollbacks,
            "stats": self.stats,
            "gave_up": gave_up,
            "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        try:
            snapshots.write_tracker(self.ckpt_dir, data)
        except OSError as exc:
            self._disk_failed(snapshots.TRACKER_NAME, exc)

    def _set_aside(self, paths: list[Path], why: object) -> None:
        """Rename unreadable files to ``*.unreadable`` (rank 0) and say so once."""
        if self.rank == 0:
            for p in paths:
                if p.exists():
                    snapshots.set_aside(p)
        self._report.warn_once("fresh", f"seismo Guard: {why}; fresh_if_unreadable=True: those files were renamed to "
                                        "*.unreadable and the run starts from step 0")


def _is_zero(optimizer: torch.optim.Optimizer) -> bool:
    # not imported here: torch.distributed.optim scripts functional optimizers at import (slow, warns);
    # a ZeroRedundancyOptimizer that exists has imported its module already
    module = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    cls = getattr(module, "ZeroRedundancyOptimizer", None)
    return cls is not None and isinstance(optimizer, cls)


def _check_wrappers(model: object, optimizer: object, cfg: GuardConfig) -> None:
    """Wrappers the Guard cannot see through correctly: a one-line ConfigError at construction."""
    if getattr(optimizer, "scaler", None) is not None:
        raise ConfigError(f"optimizer: {type(optimizer).__name__} steps through a GradScaler (fp16); the Guard steps the "
                          "inner optimizer and cannot unscale: train in bf16, or unscale and use the Guard's skip yourself")
    if cfg.policy == "rollback" and any(c.__name__ == "FullyShardedDataParallel" for c in type(model).__mro__):
        raise ConfigError(f"model: rollback checkpoints of an FSDP1 {type(model).__name__} model are not supported; "
                          "use FSDP2 (fully_shard) or policy='skip'")
