"""What a framework callback drives: the Monitor, the step's loss, new events, the Guard.

Both callbacks (:mod:`seismo.integrations.huggingface`, :mod:`seismo.integrations.lightning`) do
the same few things at the framework's hook points; this module holds them once:

- :class:`CallbackOptions`: the callbacks' options, checked when the callback is built, so a bad
  value fails before training starts (a :class:`~seismo.errors.ConfigError` naming the option).
- :class:`AttachedMonitor`: a :class:`seismo.Monitor` with detectors, built at train start from the
  framework's model and (wrapped) optimizer. It sums on the device the loss of every backward pass
  of an optimizer step (:meth:`AttachedMonitor.add_loss`), so the recorded loss is the one the
  step's gradient is the gradient of: with gradient accumulation, the mean of the micro-batch losses
  the framework backpropagates. It collects the events (detectors' and Guard's) for the framework's
  loggers and for ``stop_on``, and the latest host values of each signal for logging.
- :class:`GuardedStep`: puts :meth:`seismo.Guard.step` (policy ``skip``) in place of the inner
  optimizer's ``step`` so the framework's own ``optimizer.step()`` goes through the Guard.

Failure rule: a Monitor that cannot be built, or a callback part that raises, is switched off with
one warning; training goes on.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from seismo._io import json_default
from seismo.errors import ConfigError
from seismo.events import KINDS, SEVERITIES, Event
from seismo.mitigate.guard import GUARD_KINDS, GuardConfig, GuardGaveUp
from seismo.mitigate.guard import Guard as _Guard
from seismo.monitor import MonitorConfig
from seismo.session import Monitor

__all__ = ["CallbackOptions", "AttachedMonitor", "GuardedStep", "event_line", "grad_norm", "jsonable", "PREFIX"]

#: Prefix of every name seismo sends through a framework's loggers.
PREFIX = "seismo/"


def _check_names(option: str, value: Any, allowed: Sequence[str], extra: Sequence[str] = ()) -> tuple[str, ...]:
    """``value`` (a name or a sequence of names, or None) as a tuple; a ConfigError for unknown names."""
    if value is None:
        return ()
    names = (value,) if isinstance(value, str) else value
    try:
        names = tuple(names)
    except TypeError:
        raise ConfigError(f"{option}: expected an event kind, a list of kinds or None, got {type(value).__name__}") from None
    unknown = [n for n in names if not isinstance(n, str) or n not in (*allowed, *extra)]
    if unknown:
        raise ConfigError(f"{option}: unknown event kind(s) {unknown}; choose from {sorted({*allowed, *extra})}")
    return names


@dataclass
class CallbackOptions:
    """Options shared by the Trainer and Lightning callbacks (validated in ``__post_init__``)."""

    store: Any = None
    """Run store (a path such as ``"runs/seismo.sqlite"`` or a ``RunStore``) receiving every record
    and event; None keeps them in memory (``callback.monitor``)."""
    run_name: str | None = None
    """Name of the stored run (default: the framework's run or output name)."""
    config: MonitorConfig | None = None
    """Monitor options (preset, ``flush_every``, ...); ``start_step`` is set from the framework."""
    diagnose: Any = True
    """Run seismo's detectors (True), none (False), or the given :class:`seismo.diagnose.Diagnoser`."""
    alerts: Any = True
    """Print events to stderr (rate-limited), not at all (False), or through the given event sink."""
    stop_on: tuple[str, ...] = ()
    """Event kinds that stop training (``"nonfinite"``, ...); ``"critical"`` means any critical event."""
    guard: str | None = None
    """``"skip"``: run the Guard's skip policy on every optimizer step; None: no Guard."""
    guard_config: GuardConfig | None = None
    """Guard options (its ``policy`` must be ``"skip"``)."""
    log_signals: tuple[str, ...] | None = None
    """Name prefixes of the signals sent to the framework's loggers (None: every signal)."""
    sinks: tuple[Any, ...] = ()
    """More record/event sinks for the Monitor (``seismo.sinks.TensorBoard(...)``, ...)."""
    monitor_options: dict[str, Any] = field(default_factory=dict)
    """``MonitorConfig`` fields as keywords (``flush_every=10``, ``preset="minimal"``)."""

    def __post_init__(self) -> None:
        if self.run_name is not None and (not isinstance(self.run_name, str) or not self.run_name):
            raise ConfigError(f"run_name: must be a non-empty string or None, got {self.run_name!r}")
        if self.config is not None and not isinstance(self.config, MonitorConfig):
            raise ConfigError(f"config: expected a seismo.MonitorConfig, got {type(self.config).__name__}")
        unknown = sorted(set(self.monitor_options) - set(MonitorConfig.field_names()))
        if unknown:
            fields = sorted(MonitorConfig.field_names())
            raise ConfigError(f"SeismoCallback: unknown option(s) {unknown}; MonitorConfig fields are {fields}")
        # built now so that a bad MonitorConfig field fails here, not at train start
        self.config = dataclasses.replace(self.config or MonitorConfig(), **self.monitor_options)
        self.stop_on = _check_names("stop_on", self.stop_on, (*KINDS, *GUARD_KINDS), ("critical",))
        if self.guard not in (None, "skip"):
            hint = " (rollback is not offered inside a framework's loop: see docs/INTEGRATIONS.md)" if self.guard == "rollback" else ""
            raise ConfigError(f"guard: must be 'skip' or None, got {self.guard!r}{hint}")
        if self.guard_config is not None:
            if not isinstance(self.guard_config, GuardConfig):
                raise ConfigError(f"guard_config: expected a seismo.GuardConfig, got {type(self.guard_config).__name__}")
            if self.guard_config.policy != "skip":
                raise ConfigError(f"guard_config.policy: must be 'skip' inside a framework's loop, got {self.guard_config.policy!r}")
            if self.guard is None:
                self.guard = "skip"
        if self.log_signals is not None:
            if isinstance(self.log_signals, str):
                self.log_signals = (self.log_signals,)
            self.log_signals = tuple(self.log_signals)
            if not all(isinstance(p, str) for p in self.log_signals):
                raise ConfigError(f"log_signals: must be a list of signal-name prefixes or None, got {self.log_signals!r}")
        self.sinks = tuple(self.sinks)


def event_line(e: Event) -> str:
    """One line of text for an event: step, severity, kind, module, message, advice."""
    where = f" [{e.module}]" if e.module else ""
    advice = f" Advice: {e.advice}" if e.advice else ""
    return f"step {e.step}: {e.severity} {e.kind}{where}: {e.message}{advice}"


class _EventBuffer:
    """Event sink keeping the events not yet handed to the framework (for logging and ``stop_on``)."""

    name = "framework-callback"

    def __init__(self) -> None:
        self.pending: list[Event] = []

    def write_events(self, events: Sequence[Event]) -> None:
        self.pending.extend(events)


class AttachedMonitor:
    """The Monitor (and Guard) a callback drives. See the module docstring.

    Args:
        model, optimizer: what the framework trains (wrappers are unwrapped by the Monitor).
        options: the callback's :class:`CallbackOptions`.
        start_step: number of the first optimizer step recorded (the framework's numbering).
        run_name / run_config / meta: the stored run's name (when the options give none), config
            and metadata.
    """

    def __init__(self, model: Any, optimizer: Any, options: CallbackOptions, *, start_step: int, run_name: str,
                 run_config: Mapping[str, Any] | None = None, meta: Mapping[str, Any] | None = None):
        self.options = options
        self._buffer = _EventBuffer()
        config = dataclasses.replace(options.config, start_step=start_step)
        self.monitor = Monitor(
            model, optimizer, config, sinks=[*options.sinks, self._buffer], store=options.store,
            run_name=options.run_name or run_name, run_config=run_config, meta=meta,
            diagnose=options.diagnose, alerts=options.alerts,
        )
        self.monitor.add_listener(self._remember)
        self._latest: dict[str, float] = {}
        self._loss: Tensor | None = None
        self.grad_norm: Tensor | None = None
        self.stop_event: Event | None = None
        self.guard: _Guard | None = None
        self.guarded_step: GuardedStep | None = None
        if options.guard == "skip":
            try:
                gcfg = dataclasses.replace(options.guard_config or GuardConfig(policy="skip"), zero_grad=False)
                self.guard = _Guard(model, optimizer, gcfg, monitor=self.monitor)
            except BaseException:
                self.monitor.close("failed")  # the run store's writer is not left running
                raise
            # number the Guard's steps (and events) as the Monitor's: the framework's numbering
            self.guard.load_state_dict({"step": start_step, "skipped_ranges": [], "rollbacks": [], "lr_factor": 1.0})
            self.guarded_step = GuardedStep(self.guard, self.monitor.optimizer, self.step_loss, self.take_grad_norm)

    # --- the loss of the step ----------------------------------------------------------------
    def add_loss(self, loss: Any) -> None:
        """Add the loss of one backward pass (a tensor, kept on its device; no host sync)."""
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            return
        x = loss.detach().reshape(()).float()
        self._loss = x.clone() if self._loss is None else self._loss + x

    def step_loss(self) -> Tensor | None:
        """The loss of the optimizer step so far (sum over its backward passes)."""
        return self._loss

    def take_grad_norm(self) -> Tensor | None:
        gn, self.grad_norm = self.grad_norm, None
        return gn

    def end_step(self) -> None:
        """One optimizer step is over: record it (``Monitor.step``) and start the next one."""
        loss, self._loss = self._loss, None
        self.monitor.step(loss)

    # --- what goes to the framework's loggers --------------------------------------------------
    def _remember(self, step: int, values: dict[str, float]) -> None:
        self._latest.update(values)

    def take_log_values(self) -> dict[str, float]:
        """Flush the Monitor and return ``seismo/<signal>``: the latest value of every signal
        recorded since the last call (filtered by ``log_signals``)."""
        self.monitor.flush()
        latest, self._latest = self._latest, {}
        keep = self.options.log_signals
        return {PREFIX + k: v for k, v in latest.items() if keep is None or k.startswith(keep)}

    def take_events(self) -> list[Event]:
        """Events emitted since the last call (detectors and Guard), oldest first."""
        events, self._buffer.pending = self._buffer.pending, []
        return events

    def events_for_log(self, events: Sequence[Event]) -> tuple[dict[str, float], str]:
        """``seismo/events/<kind>``: how many events of each kind; and the events as text lines."""
        counts: dict[str, float] = {}
        for e in events:
            counts[f"{PREFIX}events/{e.kind}"] = counts.get(f"{PREFIX}events/{e.kind}", 0.0) + 1.0
        return counts, "\n".join(event_line(e) for e in events)

    def check_stop(self, events: Sequence[Event]) -> Event | None:
        """The first of ``events`` that ``stop_on`` names (kept as ``self.stop_event``), or None."""
        stop_on = self.options.stop_on
        if self.stop_event is None and stop_on:
            self.stop_event = next(
                (e for e in events if e.kind in stop_on or ("critical" in stop_on and e.severity == SEVERITIES[-1])), None
            )
        return self.stop_event

    @property
    def gave_up(self) -> GuardGaveUp | None:
        return self.guarded_step.gave_up if self.guarded_step is not None else None

    def close(self, status: str = "completed") -> None:
        """Finish the Guard and the Monitor (flush, status, close the sinks)."""
        meta: dict[str, Any] = {}
        if self.stop_event is not None:
            status = "stopped"
            meta["stopped_by"] = event_line(self.stop_event)
        if self.gave_up is not None:
            status = "failed"
            meta["guard_gave_up"] = str(self.gave_up)
        try:
            if self.guarded_step is not None:
                self.guarded_step.remove()
            if self.guard is not None:
                self.guard.close()
        finally:
            self.monitor.close(status, meta or None)


def grad_norm(optimizer: torch.optim.Optimizer) -> Tensor | None:
    """Global L2 norm of the gradients of ``optimizer``'s parameters (a device tensor, no sync)."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False) if grads else None


def jsonable(obj: Any) -> Any:
    """``obj`` with everything JSON cannot hold turned into its string (for a stored run's config)."""
    return json.loads(json.dumps(obj, default=json_default))


class GuardedStep:
    """Route every ``optimizer.step()`` of the framework through :meth:`seismo.Guard.step`.

    The inner ``torch.optim`` optimizer gets an instance attribute ``step`` (the class's hooked
    ``step`` stays untouched, so optimizer hooks still fire): the framework's wrapper (Accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``) calls it, it evaluates the closure
    if one is passed (Lightning's automatic optimization runs forward and backward in it), then
    hands the step's loss and pre-clip gradient norm to the Guard, which calls the original
    ``step`` or skips it. When the Guard gives up (a lasting non-finite loss), the
    :class:`~seismo.GuardGaveUp` is kept in ``gave_up``, no further step is applied, and the
    callback stops training.
    """

    def __init__(self, guard: _Guard, optimizer: torch.optim.Optimizer, loss: Callable[[], Tensor | None],
                 grad_norm: Callable[[], Tensor | None]):
        self.guard = guard
        self.optimizer = optimizer
        self._loss = loss
        self._grad_norm = grad_norm
        self._original = optimizer.step
        self._inside = False
        self.gave_up: GuardGaveUp | None = None
        optimizer.step = self._step

    def _step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        if self._inside:  # the Guard applying the step
            return self._original(**kwargs) if closure is None else self._original(closure, **kwargs)
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
        if self.gave_up is not None:
            return result
        loss = self._loss()
        if loss is None:  # no backward pass seen: judge the step by its gradient alone
            loss = result if isinstance(result, Tensor) and result.numel() == 1 else torch.zeros(())
        self._inside = True
        try:
            self.guard.step(loss, grad_norm=self._grad_norm())
        except GuardGaveUp as exc:
            self.gave_up = exc
            warnings.warn(f"seismo: the Guard gave up, training stops: {exc}", RuntimeWarning, stacklevel=2)
        finally:
            self._inside = False
        return result

    def remove(self) -> None:
        """Give the optimizer its own ``step`` back (if it is still ours)."""
        if self.optimizer.__dict__.get("step") == self._step:
            del self.optimizer.step
