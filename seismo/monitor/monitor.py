"""The Monitor: attach to any ``nn.Module`` + ``torch.optim`` loop and record stability signals.

    monitor = Monitor(model, optimizer, store="runs/seismo.sqlite", run_name="exp1")
    for batch in loader:
        loss = ...; loss.backward(); optimizer.step(); optimizer.zero_grad()
        monitor.step(loss)
    monitor.close()

Each probe has its own schedule. Before the forward pass of a step the probe tracks, the Monitor
*arms* it (installs its per-step hooks); untracked steps run with no hooks at all and no host
synchronisation. Probes reduce what they see to 0-d device tensors; the Monitor stacks them and
moves them to the host once every ``flush_every`` steps, then hands the records to its sinks (the
run store, detectors, loggers: one ``write_records`` call per sink and flush), to listeners and to
an in-memory history. A probe or sink that raises is disabled with one warning; training goes on.

This Monitor knows no detector: :class:`seismo.Monitor` (``seismo/session.py``) adds
``diagnose=True`` and live alerts by plugging the detectors and the printer in as sinks.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from seismo._wrappers import unwrap_model, unwrap_optimizer
from seismo.errors import ConfigError
from seismo.events import Event, Record
from seismo.monitor.config import MONITOR_PRESETS, MonitorConfig
from seismo.monitor.fanout import SinkFanout
from seismo.monitor.presets import build_probes, probes_for
from seismo.monitor.probe import HookedProbe, Probe, ProbeContext, ProbeFailure
from seismo.store.batches import log_batches
from seismo.store.run_store import RunStore
from seismo.store.sink import StoreSink

__all__ = ["Monitor", "build_probes", "MONITOR_PRESETS", "PRESETS"]

Listener = Callable[[int, dict[str, float]], None]

#: Old name of :data:`MONITOR_PRESETS`, kept for one release.
PRESETS = MONITOR_PRESETS

_EVENT_FIELDS = tuple(f.name for f in dataclasses.fields(Event))


class Monitor:
    """Record stability signals of a training loop. See the module docstring.

    Args:
        model: the model being trained. DDP, DataParallel, FSDP and ``torch.compile`` wrappers are
            unwrapped (:func:`seismo._wrappers.unwrap_model`).
        optimizer: its optimizer (needed for update, Adam-state and sharpness signals). Accelerate's
            ``AcceleratedOptimizer`` and Lightning's ``LightningOptimizer`` are unwrapped;
            ``ZeroRedundancyOptimizer`` is used as it is. Anything else that is not a
            ``torch.optim.Optimizer`` is a ConfigError naming its type.
        config: a :class:`MonitorConfig` (preset, schedules, flush interval, probe options). A
            plain dict here is the old form of ``run_config``.
        probes: a preset name (sets ``config.preset``) or a list of probes (used instead of the preset).
        sinks: record and/or event sinks (:mod:`seismo.events`): each flush is one
            ``write_records`` call per sink; events they return, and those passed to :meth:`emit`,
            go to every ``write_events``. ``flush()``/``set_status()``/``close()`` are called on close.
        store: shorthand for a :class:`~seismo.store.sink.StoreSink` first in ``sinks`` (a path, a
            ``RunStore`` or a ``StoreSink``); on rank 0 only under ``torch.distributed``.
        run_name / run_config / meta / run_id: the stored run's name, config and metadata, or the
            id of a stored run to continue (a resumed run).
        listeners: callables ``f(step, {name: value})`` called with host values at each flush.
        **options: the fields of :class:`MonitorConfig` as keywords (``every``, ``flush_every``,
            ``keep_history``, ``output``, ``blocks``, ``attention_sample``, ``probe_loss``,
            ``curvature_every``, ``start_step``); they override ``config``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any = None,
        config: MonitorConfig | Mapping[str, Any] | None = None,
        *,
        probes: str | Sequence[Probe] | None = None,
        sinks: Iterable[Any] = (),
        store: Any = None,
        run_name: str | None = None,
        run_config: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        run_id: int | None = None,
        listeners: Iterable[Listener] = (),
        **options: Any,
    ):
        self.model = unwrap_model(model)
        self.optimizer = unwrap_optimizer(optimizer) if optimizer is not None else None
        if config is not None and not isinstance(config, MonitorConfig):
            if not isinstance(config, Mapping):
                raise ConfigError(f"config: expected a MonitorConfig (or a dict stored as the run's config), got {type(config).__name__}")
            run_config = dict(config) if run_config is None else run_config
            config = None
        unknown = sorted(set(options) - set(MonitorConfig.field_names()))
        if unknown:
            facade = {"diagnose", "on_event", "alerts"} & set(unknown)
            hint = "; diagnose/on_event/alerts need seismo.Monitor (the session facade)" if facade else ""
            raise TypeError(f"seismo.monitor.Monitor() got unexpected keyword arguments {unknown}{hint}")
        if isinstance(probes, str):
            options["preset"] = probes
        if config is None or options:
            config = dataclasses.replace(config or MonitorConfig(), **options)  # __post_init__ validates
        self.config = config
        self.flush_every = config.flush_every
        self.keep_history = config.keep_history
        self.listeners: list[Listener] = list(listeners)
        self.history: dict[str, tuple[list[int], list[float]]] = {}
        self.disabled: dict[str, str] = {}
        self.events: list[Event] = []
        self._warned: set[str] = set()
        self._pending: list[tuple[int, list[str], Tensor]] = []
        self._pending_batches: list[tuple[int, Tensor, Tensor | None]] = []  # (step, sample ids, per-sample losses)
        self._since_flush = 0
        self._step = config.start_step
        self._closed = False
        self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

        self.fanout = SinkFanout()
        self.run_id: int | None = None
        if store is not None and self.rank == 0:
            sink = store if isinstance(store, StoreSink) else StoreSink(
                store if isinstance(store, RunStore) else str(store), run_name, config=run_config, meta=meta, run_id=run_id,
            )
            self.fanout.add(sink)
            self.run_id = sink.run_id
        for s in sinks:
            self.fanout.add(s)
        if self.run_id is None:
            self.run_id = next((s.run_id for s in self.fanout.sinks if isinstance(getattr(s, "run_id", None), int)), None)

        probe_list = probes_for(config) if probes is None or isinstance(probes, str) else list(probes)
        names = [p.name for p in probe_list]
        if len(set(names)) != len(names):
            raise ConfigError(f"probes: names must be unique, got {names}")
        ctx = ProbeContext(self.model, self.optimizer, on_error=self._probe_error)
        self.probes: list[Probe] = []
        for p in probe_list:
            try:
                p.attach(ctx)
                self.probes.append(p)
            except Exception as exc:  # noqa: BLE001 - a probe that cannot attach is disabled with one warning, never raised into the loop
                reason = str(exc) if isinstance(exc, ProbeFailure) else f"{type(exc).__name__}: {exc}"
                # a built-in probe may have registered hooks before failing: remove them
                self._disable(p, reason + (self._detach_quietly(p) if isinstance(p, HookedProbe) else ""))
        self._armed: set[str] = set()
        self._arm(self._step)

    @property
    def sinks(self) -> list[Any]:
        """The sinks still in use (a sink that raised has been removed)."""
        return self.fanout.sinks

    # --- probe management -------------------------------------------------------------
    def _probe_error(self, name: str, exc: BaseException) -> None:
        probe = next((p for p in self.probes if p.name == name), None)
        if probe is not None:
            self._disable(probe, f"{type(exc).__name__}: {exc}")

    def _detach_quietly(self, probe: Probe) -> str:
        """Detach ``probe``; a failure is returned as text for the caller's one warning."""
        try:
            probe.detach()
        except Exception as exc:  # noqa: BLE001 - reported in the probe's warning by the caller
            return f" (and detaching it raised {type(exc).__name__}: {exc})"
        return ""

    def _disable(self, probe: Probe, reason: str) -> None:
        self.disabled[probe.name] = reason
        if probe in self.probes:
            self.probes.remove(probe)
            reason += self._detach_quietly(probe)
        if probe.name not in self._warned:
            self._warned.add(probe.name)
            warnings.warn(f"seismo: probe '{probe.name}' is off: {reason}", RuntimeWarning, stacklevel=3)

    def _arm(self, step: int) -> None:
        self._armed = set()
        for p in list(self.probes):
            try:
                if p.schedule(step):
                    p.arm(step)
                    self._armed.add(p.name)
            except Exception as exc:  # noqa: BLE001 - a probe failure must never kill training: disabled, warned once
                self._disable(p, f"{type(exc).__name__}: {exc}")

    # --- the per-step call ------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """Index of the next step :meth:`step` will record."""
        return self._step

    def step(self, loss: Tensor | float | None = None, batch_ids: Tensor | Sequence[int] | None = None,
             sample_losses: Tensor | Sequence[float] | None = None) -> dict[str, Tensor] | None:
        """Finish the current step: collect armed probes, arm the next step's. Returns this
        step's record (name -> 0-d tensor on the device) or None if nothing was tracked.

        ``loss`` is this step's loss: a scalar tensor (0-d or one element) or a number.
        ``batch_ids`` (optional, every step): the indices of the samples that formed this step's
        batch (a 1-D int tensor or a list), stored in the run store's ``batches`` table so a loss
        spike names its batch; ``sample_losses`` (optional): each sample's loss, same length.
        Both stay on the device until the flush (no host sync here).
        """
        if self._closed:
            raise RuntimeError("Monitor.step() after close()")
        if loss is not None:
            loss = _scalar_loss(loss)
        step = self._step
        if batch_ids is not None:
            self._pending_batches.append((step, *_batch_tensors(batch_ids, sample_losses)))
        record: dict[str, Tensor] = {}
        for p in list(self.probes):
            if p.name not in self._armed:
                continue
            try:
                record.update(p.collect(step, loss))
            except Exception as exc:  # noqa: BLE001 - a probe failure must never kill training: disabled, warned once
                self._disable(p, f"{type(exc).__name__}: {exc}")
        self._step = step + 1
        self._arm(self._step)
        if record:
            self._queue(step, record)
        self._since_flush += 1
        if self._since_flush >= self.flush_every:
            self.flush()
        return record or None

    def log(self, values: Mapping[str, Tensor | float], step: int | None = None) -> None:
        """Record extra scalars (e.g. ``val/loss``) at ``step`` (default: the last step)."""
        rec = {k: (v.detach().float().reshape(()) if isinstance(v, Tensor) else torch.tensor(float(v))) for k, v in values.items()}
        if rec:
            self._queue(self._step - 1 if step is None else step, rec)

    def _queue(self, step: int, record: dict[str, Tensor]) -> None:
        names = list(record)
        devs = {v.device for v in record.values()}
        f32 = torch.float32
        vals = [v if v.dtype is f32 and v.dim() == 0 else v.reshape(()).float() for v in record.values()]
        if len(devs) > 1:
            vals = [v.cpu() for v in vals]
        self._pending.append((step, names, torch.stack(vals)))

    def flush(self) -> None:
        """Move pending values to the host (one transfer) and hand them to listeners and sinks."""
        self._since_flush = 0
        if self._pending_batches:
            self._flush_batches()
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        by_dev: dict[Any, list[int]] = {}
        for i, (_, _, t) in enumerate(pending):
            by_dev.setdefault(t.device, []).append(i)
        host: list[list[float]] = [[] for _ in pending]
        for idx in by_dev.values():
            flat = torch.cat([pending[i][2] for i in idx]).cpu().tolist()
            pos = 0
            for i in idx:
                n = len(pending[i][1])
                host[i] = flat[pos : pos + n]
                pos += n
        records: list[Record] = []
        for (step, names, _), values in zip(pending, host):
            rec = dict(zip(names, values))
            records.append((step, rec))
            if self.keep_history:
                for n, v in rec.items():
                    s, vs = self.history.setdefault(n, ([], []))
                    s.append(step)
                    vs.append(v)
            for fn in list(self.listeners):
                try:
                    fn(step, rec)
                except Exception as exc:  # noqa: BLE001 - a listener failure must never kill training: removed, warned once
                    self.listeners.remove(fn)
                    warnings.warn(f"seismo: listener {getattr(fn, '__name__', fn)!r} is off: {exc!r}", RuntimeWarning, stacklevel=2)
        self.emit(self.fanout.write_records(records))

    def _flush_batches(self) -> None:
        """Write the pending batch ids (and per-sample losses) to the run store (one host transfer)."""
        pending, self._pending_batches = self._pending_batches, []
        sink = next((s for s in self.fanout.sinks if isinstance(s, StoreSink)), None)
        if sink is None or "batches" in self.disabled:
            return
        try:
            ids = torch.cat([t.to("cpu", torch.int64) for _, t, _ in pending]).tolist()
            losses = [None if lo is None else lo.to("cpu", torch.float32) for _, _, lo in pending]
            rows, pos = [], 0
            for (step, t, _), lo in zip(pending, losses):
                n = t.numel()
                rows.append((step, ids[pos: pos + n], None if lo is None else lo.tolist()))
                pos += n
            log_batches(sink.store, sink.run_id, rows)
        except Exception as exc:  # noqa: BLE001 - recording batch ids must never kill training: turned off, warned once
            self.disabled["batches"] = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"seismo: batch ids are no longer recorded: {exc!r}", RuntimeWarning, stacklevel=2)

    def add_listener(self, fn: Listener) -> None:
        self.listeners.append(fn)

    def add_sink(self, sink: Any) -> None:
        """Add a record and/or event sink (see ``sinks``)."""
        self.fanout.add(sink)

    def emit(self, events: Sequence[Event]) -> None:
        """Record events (``self.events``) and hand them to every event sink (and to logging)."""
        if events:
            events = list(events)
            self.events.extend(events)
            self.fanout.write_events(events)

    def write_events(self, events: Sequence[Event]) -> None:
        """The Monitor as an event sink (for the Guard, say): the same as :meth:`emit`."""
        self.emit(events)

    def events_sink(self, events: Sequence[Mapping[str, Any]]) -> None:
        """Old entry point: hand event dicts to the event sinks (not added to ``self.events``)."""
        if events:
            self.fanout.write_events([Event(**{k: e[k] for k in _EVENT_FIELDS if k in e}) for e in events])

    def series(self, name: str) -> tuple[list[int], list[float]]:
        """Flushed (steps, values) of one signal from the in-memory history."""
        if name not in self.history:
            raise KeyError(f"no signal {name!r}; recorded: {sorted(self.history)[:20]}")
        return self.history[name]

    def latest(self, prefix: str, reduce: Callable[[list[float]], float] = max) -> float:
        """Reduce the latest flushed values of every signal starting with ``prefix`` (nan if none)."""
        vals = [vs[-1] for n, (_, vs) in self.history.items() if n.startswith(prefix) and vs]
        return reduce(vals) if vals else math.nan

    def set_status(self, status: str, meta: Mapping[str, Any] | None = None) -> None:
        """Set the run's status in the sinks that keep one (the run store)."""
        self.fanout.set_status(status, dict(meta) if meta else None)

    def close(self, status: str = "completed", meta: Mapping[str, Any] | None = None) -> None:
        """Flush, detach every probe, set the run's status and close the sinks; idempotent."""
        if self._closed:
            return
        self.flush()
        for p in self.probes:
            failure = self._detach_quietly(p)
            if failure:
                warnings.warn(f"seismo: probe '{p.name}'{failure}", RuntimeWarning, stacklevel=2)
        self._closed = True
        self.fanout.flush()
        self.set_status(status, meta)
        self.fanout.close()

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("failed" if exc_type is not None else "completed")


def _batch_tensors(batch_ids: Any, sample_losses: Any) -> tuple[Tensor, Tensor | None]:
    """``batch_ids`` as a detached 1-D tensor (device kept) and ``sample_losses`` likewise; a
    one-line ConfigError for anything else."""
    ids = batch_ids.detach() if isinstance(batch_ids, Tensor) else torch.as_tensor(list(batch_ids), dtype=torch.int64)
    if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
        raise ConfigError(f"batch_ids: Monitor.step needs a 1-D tensor or list of integer sample indices, got {ids.dtype} of shape "
                          f"{tuple(ids.shape)}")
    if sample_losses is None:
        return ids.clone(), None
    lo = sample_losses.detach() if isinstance(sample_losses, Tensor) else torch.as_tensor(list(sample_losses), dtype=torch.float32)
    if tuple(lo.shape) != tuple(ids.shape):
        raise ConfigError(f"sample_losses: Monitor.step needs one loss per batch id ({ids.numel()}), got shape {tuple(lo.shape)}")
    return ids.clone(), lo.float().clone()


def _scalar_loss(loss: Any) -> Tensor:
    """The loss as a tensor; a one-line ConfigError for anything that is not one number."""
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ConfigError(f"loss: Monitor.step needs a scalar loss (one element), got a tensor of shape {tuple(loss.shape)}")
        return loss
    if isinstance(loss, bool) or not isinstance(loss, numbers.Real):
        raise ConfigError(f"loss: Monitor.step needs a scalar loss (a tensor or a number), got {type(loss).__name__}")
    return torch.tensor(float(loss))
