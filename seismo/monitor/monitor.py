"""The Monitor: attach to any ``nn.Module`` + ``torch.optim`` loop and record stability signals.

    monitor = Monitor(model, optimizer, store="runs/seismo.sqlite", run_name="exp1")
    for batch in loader:
        loss = ...; loss.backward(); optimizer.step(); optimizer.zero_grad()
        monitor.step(loss)
    monitor.close()

Each probe has its own schedule. Before the forward pass of a step the probe tracks, the Monitor
*arms* it (installs its per-step hooks); untracked steps run with no hooks at all and no host
synchronisation. Probes reduce what they see to 0-d device tensors; the Monitor stacks them and
moves them to the host once every ``flush_every`` steps, then hands the rows to the run store
(a background writer thread), to live listeners (detectors, sinks) and to an in-memory history.
A probe that raises is disabled with one warning; training goes on.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from seismo.monitor.activations import ActivationProbe
from seismo.monitor.adam import AdamProbe
from seismo.monitor.attention import AttentionProbe
from seismo.monitor.gradients import GradientProbe, UpdateProbe
from seismo.monitor.logits import LogitsProbe
from seismo.monitor.loss import LossProbe
from seismo.monitor.probe import Probe, ProbeContext, ProbeFailure
from seismo.monitor.schedules import every

__all__ = ["Monitor", "build_probes", "PRESETS"]

Listener = Callable[[int, dict[str, float]], None]

PRESETS = ("default", "full", "minimal")
DEFAULT_CURVATURE_EVERY = 500


def build_probes(preset: str = "default", every_n: int | None = None, **options: Any) -> list[Probe]:
    """Probes of a preset, cheapest first.

    - ``minimal``: loss and gradient norms, every step.
    - ``default``: + attention, output logits, activations every step; update norms and Adam
      state every 10 steps.
    - ``full``: everything every step (+ curvature when ``probe_loss`` is given, every
      ``curvature_every`` steps, 500 by default).

    ``every_n`` tracks every probe every N steps instead (curvature: every
    max(N, ``curvature_every``) steps). One Lanczos run costs about as much as 10-20 training
    steps, so every 500 steps keeps it near 2-4% of training time; sharpness drifts slowly
    except near the edge of stability, where a denser schedule (or an explicit
    ``CurvatureProbe``) is worth its cost.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown monitor preset {preset!r}; choose one of {PRESETS}")
    base = every(every_n) if every_n else every(1)
    slow = every(every_n) if every_n else every(10 if preset == "default" else 1)
    probes: list[Probe] = [LossProbe(schedule=base), GradientProbe(schedule=base)]
    if preset == "minimal":
        return probes
    probes += [
        AttentionProbe(schedule=base, max_batch=options.get("attention_sample", 2)),
        LogitsProbe(schedule=base, output=options.get("output")),
        ActivationProbe(schedule=base, blocks=options.get("blocks")),
        UpdateProbe(schedule=slow),
        AdamProbe(schedule=slow),
    ]
    if preset == "full" and options.get("probe_loss") is not None:
        from seismo.monitor.curvature_probe import CurvatureProbe

        curvature_every = options.get("curvature_every") or DEFAULT_CURVATURE_EVERY
        if not isinstance(curvature_every, int) or curvature_every < 1:
            raise ValueError(f"curvature_every must be a positive integer, got {curvature_every!r}")
        probes.append(CurvatureProbe(options["probe_loss"], schedule=every(max(every_n or 1, curvature_every))))
    return probes


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel / DataParallel / torch.compile wrappers keep the real model here.
    for attr in ("module", "_orig_mod"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            return _unwrap(inner)
    return model


class Monitor:
    """Record stability signals of a training loop. See the module docstring.

    Args:
        model: the model being trained (DDP / compiled wrappers are unwrapped).
        optimizer: its optimizer (needed for update, Adam-state and sharpness signals).
        store: path of a SQLite run store (or a ``RunStore``); None keeps records in memory only.
        run_name: name of the run in the store.
        probes: a preset name (``"default"``, ``"full"``, ``"minimal"``) or a list of probes.
        every: track every probe every N steps (overrides the preset's schedules).
        config / meta: JSON-able dicts stored with the run.
        listeners: callables ``f(step, {name: value})`` called with host values at each flush.
        flush_every: steps between host transfers (1 = every step, for live displays).
        keep_history: keep every flushed value in ``self.history``.
        output / blocks / attention_sample / probe_loss / curvature_every: options for the
            preset's probes (``curvature_every``: steps between curvature probes, default 500).
        start_step / run_id: continue a resumed run (step numbering and the same stored run).
        diagnose: True (default detectors) or a ``seismo.diagnose.Diagnoser``: run the detectors
            on every flushed record; events go to the run store, ``self.events`` and ``on_event``.
        on_event: called with each batch of new events; by default (``alerts=True``) a rate-limited
            :class:`seismo.diagnose.AlertPrinter` prints them to stderr.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        store: Any = None,
        run_name: str | None = None,
        probes: str | Sequence[Probe] = "default",
        every: int | None = None,
        config: dict | None = None,
        meta: dict | None = None,
        listeners: Iterable[Listener] = (),
        flush_every: int = 50,
        keep_history: bool = True,
        start_step: int = 0,
        output: str | None = None,
        blocks: list[str] | None = None,
        attention_sample: int = 2,
        probe_loss: Callable[[nn.Module], Tensor] | None = None,
        curvature_every: int | None = None,
        run_id: int | None = None,
        diagnose: Any = False,
        on_event: Callable[[list], None] | None = None,
        alerts: bool = True,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Monitor needs an nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError("flush_every must be a positive integer")
        self.model = _unwrap(model)
        self.optimizer = optimizer
        self.flush_every = flush_every
        self.listeners: list[Listener] = list(listeners)
        self.keep_history = keep_history
        self.history: dict[str, tuple[list[int], list[float]]] = {}
        self.disabled: dict[str, str] = {}
        self._warned: set[str] = set()
        self._pending: list[tuple[int, list[str], Tensor]] = []
        self._since_flush = 0
        self._step = start_step
        self._closed = False
        self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

        if isinstance(probes, str):
            probe_list = build_probes(
                probes, every, output=output, blocks=blocks, attention_sample=attention_sample, probe_loss=probe_loss,
                curvature_every=curvature_every,
            )
        else:
            probe_list = list(probes)
        names = [p.name for p in probe_list]
        if len(set(names)) != len(names):
            raise ValueError(f"probe names must be unique, got {names}")
        ctx = ProbeContext(self.model, optimizer, on_error=self._probe_error)
        self.probes: list[Probe] = []
        for p in probe_list:
            try:
                p.attach(ctx)
                self.probes.append(p)
            except ProbeFailure as exc:
                self._disable(p, str(exc), already_attached=False)
        self._armed: set[str] = set()
        self._arm(self._step)

        self.run_id: int | None = None
        self._writer = None
        self._store = None
        if store is not None and self.rank == 0:
            from seismo.store import AsyncWriter, RunStore

            self._store = store if isinstance(store, RunStore) else RunStore(store)
            if run_id is not None:  # resuming: keep writing into the same run
                self._store.find_run(int(run_id))
                self._store.set_status(int(run_id), "running")
                self.run_id = int(run_id)
            else:
                self.run_id = self._store.create_run(run_name or "run", config=config or {}, meta=meta or {})
            self._writer = AsyncWriter(self._store.path, self.run_id)

        self.diagnoser = None
        self.events: list = []
        if diagnose:
            from seismo.diagnose.engine import Diagnoser

            self.diagnoser = diagnose if isinstance(diagnose, Diagnoser) else Diagnoser()
            self.diagnoser.sinks.append(self._on_events)
            self.listeners.append(self.diagnoser)
        if self.diagnoser is not None and on_event is None and alerts:
            from seismo.diagnose.engine import AlertPrinter

            on_event = AlertPrinter()
        self._on_event = on_event

    def _on_events(self, events: list) -> None:
        self.events.extend(events)
        self.events_sink([e.to_dict() for e in events])
        if self._on_event is not None:
            self._on_event(events)

    # --- probe management -------------------------------------------------------------
    def _probe_error(self, name: str, exc: BaseException) -> None:
        probe = next((p for p in self.probes if p.name == name), None)
        if probe is not None:
            self._disable(probe, f"{type(exc).__name__}: {exc}")

    def _disable(self, probe: Probe, reason: str, already_attached: bool = True) -> None:
        self.disabled[probe.name] = reason
        if probe in self.probes:
            self.probes.remove(probe)
        if already_attached:
            try:
                probe.detach()
            except Exception:
                pass
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
            except Exception as exc:
                self._disable(p, f"{type(exc).__name__}: {exc}")

    # --- the per-step call ------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """Index of the next step :meth:`step` will record."""
        return self._step

    def step(self, loss: Tensor | float | None = None) -> dict[str, Tensor] | None:
        """Finish the current step: collect armed probes, arm the next step's. Returns this
        step's record (name -> 0-d tensor on the device) or None if nothing was tracked."""
        if self._closed:
            raise RuntimeError("Monitor.step() after close()")
        step = self._step
        if loss is not None and not isinstance(loss, Tensor):
            loss = torch.tensor(float(loss))
        record: dict[str, Tensor] = {}
        for p in list(self.probes):
            if p.name not in self._armed:
                continue
            try:
                record.update(p.collect(step, loss))
            except Exception as exc:
                self._disable(p, f"{type(exc).__name__}: {exc}")
        self._step = step + 1
        self._arm(self._step)
        if record:
            self._queue(step, record)
        self._since_flush += 1
        if self._since_flush >= self.flush_every:
            self.flush()
        return record or None

    def log(self, values: dict[str, Tensor | float], step: int | None = None) -> None:
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
        """Move pending values to the host (one transfer) and hand them to store and listeners."""
        self._since_flush = 0
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
        rows = []
        for (step, names, _), values in zip(pending, host):
            rec = dict(zip(names, values))
            rows.extend((step, n, v) for n, v in rec.items())
            if self.keep_history:
                for n, v in rec.items():
                    s, vs = self.history.setdefault(n, ([], []))
                    s.append(step)
                    vs.append(v)
            for fn in list(self.listeners):
                try:
                    fn(step, rec)
                except Exception as exc:
                    self.listeners.remove(fn)
                    warnings.warn(f"seismo: listener {getattr(fn, '__name__', fn)!r} is off: {exc!r}", RuntimeWarning, stacklevel=2)
        if self._writer is not None:
            self._writer.put_metrics(rows)

    def add_listener(self, fn: Listener) -> None:
        self.listeners.append(fn)

    def events_sink(self, events: list[dict]) -> None:
        """Write events (dicts with step, kind, severity, module, message, evidence, advice)."""
        if self._writer is not None and events:
            self._writer.put_events(events)

    def series(self, name: str) -> tuple[list[int], list[float]]:
        """Flushed (steps, values) of one signal from the in-memory history."""
        if name not in self.history:
            raise KeyError(f"no signal {name!r}; recorded: {sorted(self.history)[:20]}")
        return self.history[name]

    def latest(self, prefix: str, reduce: Callable[[list[float]], float] = max) -> float:
        """Reduce the latest flushed values of every signal starting with ``prefix`` (nan if none)."""
        vals = [vs[-1] for n, (_, vs) in self.history.items() if n.startswith(prefix) and vs]
        return reduce(vals) if vals else math.nan

    def set_status(self, status: str, meta: dict | None = None) -> None:
        if self._store is not None and self.run_id is not None:
            if self._writer is not None:
                self._writer.flush()
            self._store.set_status(self.run_id, status)
            if meta:
                self._store.update_meta(self.run_id, meta)

    def close(self, status: str = "completed", meta: dict | None = None) -> None:
        if self._closed:
            return
        self.flush()
        for p in self.probes:
            try:
                p.detach()
            except Exception:
                pass
        self._closed = True
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.set_status(status, meta)

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("failed" if exc_type is not None else "completed")
