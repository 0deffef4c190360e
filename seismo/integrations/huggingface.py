"""seismo inside ``transformers.Trainer``: one callback, nothing else changes.

    from seismo.integrations.huggingface import SeismoCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[SeismoCallback(store="runs/seismo.sqlite", run_name="exp1")])
    trainer.train()

At train begin the callback builds a :class:`seismo.Monitor` (with detectors) on the Trainer's model
and optimizer (the ``AcceleratedOptimizer`` is unwrapped by the Monitor). Each optimizer step is one
recorded step, numbered like the Trainer's ``global_step``. Its ``loss`` is the loss the Trainer
itself adds up and reports: the callback wraps the Trainer's ``training_step`` (on the instance) and
sums on the device what each micro-batch's ``training_step`` returns, the value the Trainer adds to
its logged loss (already divided by the gradient-accumulation steps when the Trainer divides it). With
``logging_steps=1`` the recorded loss is the logged ``loss`` of every step; with ``logging_steps=k``
the Trainer logs the mean over k steps and seismo keeps each step's own value. One difference, on
purpose: with ``logging_nan_inf_filter`` (the default) the Trainer logs a non-finite micro-batch loss
as the running mean; seismo records the non-finite value, so its ``nonfinite`` detector fires.

At every logging step (``control.should_log``) seismo's latest values go through ``Trainer.log`` as
``seismo/<signal>`` (so every ``report_to`` backend gets them, and ``trainer.state.log_history``),
with the new events as ``seismo/events/<kind>`` counts and a ``seismo/events`` text (TensorBoard
shows it as text). Records and events also go to the run store and the Monitor's other sinks.

The Trainer is found at train begin on the call stack (the ``Trainer`` whose callback handler holds
this callback); if it cannot be found (a Trainer-like loop of your own), the callback warns once and
records every signal but the loss, and does not log through ``Trainer.log``.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers import __version__ as _transformers_version

from seismo.errors import ConfigError
from seismo.events import Event
from seismo.integrations._attached import AttachedMonitor, CallbackOptions, grad_norm, jsonable
from seismo.mitigate.guard import GuardConfig
from seismo.monitor import MonitorConfig
from seismo.store import StoreError

__all__ = ["SeismoCallback"]


class SeismoCallback(TrainerCallback):
    """Monitor, diagnose and optionally guard a ``transformers.Trainer`` run (module docstring).

    Args:
        store: run store path (``"runs/seismo.sqlite"``) or ``RunStore``; None keeps records in
            memory only (``callback.monitor.history``).
        run_name: the stored run's name (default: ``args.run_name``, else the output directory's name).
        config: a :class:`seismo.MonitorConfig`; its fields can also be given as keywords
            (``preset="minimal"``, ``flush_every=10``). ``start_step`` follows the Trainer.
        diagnose: seismo's detectors (True), none (False) or a :class:`seismo.diagnose.Diagnoser`.
        alerts: print events to stderr (rate-limited) or not (False), or an event sink of your own.
        stop_on: event kind(s) that stop training (``control.should_training_stop``), e.g.
            ``"nonfinite"``; ``"critical"`` stops on any critical event. Events are seen at the
            Monitor's flushes (every ``flush_every`` steps, and at every logging step).
        guard: ``"skip"`` runs :class:`seismo.Guard`'s skip policy on every optimizer step: a step
            with a non-finite or spiking loss or gradient norm changes nothing. Rollback is not
            offered here (docs/INTEGRATIONS.md says why).
        guard_config: a :class:`seismo.GuardConfig` (``policy="skip"``) for the Guard's thresholds.
        log_signals: name prefixes of the signals sent through ``Trainer.log`` (default: all).
        sinks: more record/event sinks for the Monitor (``seismo.sinks.TensorBoard(...)``).

    After training, ``callback.monitor`` is the (closed) Monitor: ``history``, ``events``,
    ``run_id``; ``callback.guard`` the Guard when ``guard="skip"``.
    """

    def __init__(
        self,
        store: Any = None,
        run_name: str | None = None,
        *,
        config: MonitorConfig | None = None,
        diagnose: Any = True,
        alerts: Any = True,
        stop_on: str | list[str] | None = None,
        guard: str | None = None,
        guard_config: GuardConfig | None = None,
        log_signals: str | list[str] | None = None,
        sinks: list[Any] | tuple[Any, ...] = (),
        **monitor_options: Any,
    ):
        self.options = CallbackOptions(
            store=store, run_name=run_name, config=config, diagnose=diagnose, alerts=alerts, stop_on=stop_on, guard=guard,
            guard_config=guard_config, log_signals=log_signals, sinks=sinks, monitor_options=monitor_options,
        )
        self.attached: AttachedMonitor | None = None
        self.trainer: Trainer | None = None
        self._wrapped_step: Any = None
        self._active = False
        self._micro_batches = 0
        self._unlogged: list[Event] = []
        self._warned: set[str] = set()

    @property
    def monitor(self):
        """The :class:`seismo.Monitor` of the current (or last) run; None before train begin."""
        return self.attached.monitor if self.attached is not None else None

    @property
    def guard(self):
        """The :class:`seismo.Guard` when ``guard="skip"``, else None."""
        return self.attached.guard if self.attached is not None else None

    # --- Trainer events ------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self._active:  # a second trainer.train() with the same callback: a new run
            self._close("completed")
        self.attached = None
        self._unlogged = []
        self.trainer = _find_trainer(self)
        if self.trainer is None:
            self._warn("trainer", "seismo: SeismoCallback cannot find the transformers.Trainer running it; the loss is "
                                  "not recorded and nothing is sent through Trainer.log")
        if model is None or optimizer is None:
            self._warn("attach", "seismo: SeismoCallback got no model or optimizer at train begin; it is off")
            return control
        try:
            self.attached = AttachedMonitor(
                model, optimizer, self.options, start_step=state.global_step + 1, run_name=_run_name(args),
                run_config=_training_args(args), meta=_meta(model),
            )
        except (ConfigError, StoreError):
            raise  # the user's input (a store that is not one, say): before the first step, one clear line
        except Exception as exc:  # noqa: BLE001 - a monitor failure never kills training: the callback is off, warned once
            self._warn("attach", f"seismo: SeismoCallback is off: building the Monitor raised {type(exc).__name__}: {exc}")
            return control
        self._active = True
        if self.trainer is not None:
            self._wrap_training_step(self.trainer)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        a = self.attached if self._active else None
        if a is None:
            return control
        try:
            a.end_step()
            self._micro_batches = 0
            self._report(a, control, log_now=control.should_log)
        except Exception as exc:  # noqa: BLE001 - a monitor failure never kills training: the callback is off, warned once
            self._warn("step", f"seismo: SeismoCallback is off after step {state.global_step}: {type(exc).__name__}: {exc}")
            self._close("completed")
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        a = self.attached if self._active else None
        if a is None or not control.should_log:  # logging_strategy="epoch" logs here
            return control
        try:
            self._report(a, control, log_now=True)
        except Exception as exc:  # noqa: BLE001 - a monitor failure never kills training: the callback is off, warned once
            self._warn("step", f"seismo: SeismoCallback is off at the end of epoch {state.epoch}: {type(exc).__name__}: {exc}")
            self._close("completed")
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._active:
            self._close("completed")
        return control

    # --- internals -------------------------------------------------------------------------------
    def _report(self, a: AttachedMonitor, control, log_now: bool) -> None:
        """Stop on a ``stop_on`` event; at a logging step, send values and events through ``Trainer.log``."""
        new = a.take_events()
        log_now = log_now and self.trainer is not None
        values = a.take_log_values() if log_now else {}  # flushes: that flush's events come with it
        new += a.take_events()
        self._unlogged += new
        if a.check_stop(new) is not None or a.gave_up is not None:
            control.should_training_stop = True
        if not log_now:
            return
        counts, text = a.events_for_log(self._unlogged)
        self._unlogged = []
        logs: dict[str, Any] = {**values, **counts}
        if text:
            logs["seismo/events"] = text
        if logs:
            self.trainer.log(logs)
            control.should_log = True  # Trainer.log cleared it: the Trainer's own log of this step still comes

    def _wrap_training_step(self, trainer: Trainer) -> None:
        original = trainer.training_step
        guard = self.attached.guard is not None

        def training_step(*args: Any, **kwargs: Any) -> torch.Tensor:
            loss = original(*args, **kwargs)
            a = self.attached
            if a is None or not self._active:
                return loss
            try:
                a.add_loss(loss)
                self._micro_batches += 1
                last = getattr(trainer, "current_gradient_accumulation_steps", trainer.args.gradient_accumulation_steps)
                if guard and self._micro_batches >= last:
                    a.grad_norm = grad_norm(a.monitor.optimizer)  # after the last backward pass, before the Trainer clips
            except Exception as exc:  # noqa: BLE001 - a monitor failure never kills training: the callback is off, warned once
                self._warn("step", f"seismo: SeismoCallback is off: reading the loss raised {type(exc).__name__}: {exc}")
                self._close("completed")
            return loss

        trainer.training_step = training_step
        self._wrapped_step = training_step

    def _close(self, status: str) -> None:
        """Undo the wrapping and close the Monitor (kept readable as ``callback.monitor``)."""
        self._active = False
        if self.trainer is not None and self.trainer.__dict__.get("training_step") is self._wrapped_step:
            del self.trainer.training_step
        self._wrapped_step = None
        if self.attached is None:
            return
        try:
            self.attached.close(status)
        except Exception as exc:  # noqa: BLE001 - closing the Monitor must not hide the run's result
            self._warn("close", f"seismo: closing the Monitor raised {type(exc).__name__}: {exc}")

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)


def _find_trainer(callback: TrainerCallback) -> Trainer | None:
    """The ``Trainer`` up the call stack whose callback handler holds ``callback``."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            obj = frame.f_locals.get("self")
            if isinstance(obj, Trainer) and callback in getattr(obj.callback_handler, "callbacks", ()):
                return obj
            frame = frame.f_back
    finally:
        del frame
    return None


def _run_name(args: Any) -> str:
    name = getattr(args, "run_name", None)
    if name:
        return str(name)
    out = getattr(args, "output_dir", None)
    return Path(out).name if out else "hf-trainer"


def _training_args(args: Any) -> dict[str, Any]:
    try:
        return {"training_args": jsonable(args.to_sanitized_dict())}
    except Exception:  # noqa: BLE001 - the stored config is a convenience; the run goes on without it
        return {}


def _meta(model: Any) -> dict[str, Any]:
    return {"framework": "transformers", "framework_version": _transformers_version, "model_class": type(model).__name__}
