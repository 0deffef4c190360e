"""seismo inside Lightning 2.x (``lightning.pytorch``): one callback, nothing else changes.

    from seismo.integrations.lightning import SeismoCallback
    trainer = lightning.pytorch.Trainer(max_steps=1000, callbacks=[SeismoCallback(store="runs/seismo.sqlite")])
    trainer.fit(module, datamodule)

At train start the callback builds a :class:`seismo.Monitor` (with detectors) on the
``LightningModule`` and the Trainer's optimizer. Each optimizer step is one recorded step, numbered
as Lightning's loggers number it (``trainer.global_step`` before the step: the first is 0). Its
``loss`` is the sum of the losses backpropagated since the last optimizer step, read on the device
from the ``on_before_backward`` hook: in automatic optimization Lightning divides each micro-batch's
loss by ``accumulate_grad_batches`` before backward, so with gradient accumulation the recorded loss
is the mean of the micro-batch losses; in manual optimization it is what your ``training_step``
passes to ``manual_backward`` between two ``optimizer.step()`` calls (divide by your accumulation
count, as you must for the gradient, and it is the mean too).

Every ``trainer.log_every_n_steps`` steps seismo's latest values go to every Lightning logger
(``logger.log_metrics``) as ``seismo/<signal>``, with the new events as ``seismo/events/<kind>``
counts; loggers with a text channel (TensorBoard's ``add_text``) also get the events as text.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from lightning import __version__ as _lightning_version
from lightning.pytorch import Callback

from seismo._wrappers import unwrap_optimizer
from seismo.errors import ConfigError
from seismo.events import Event
from seismo.integrations._attached import AttachedMonitor, CallbackOptions, grad_norm, jsonable
from seismo.mitigate.guard import GuardConfig
from seismo.monitor import MonitorConfig
from seismo.store import StoreError

__all__ = ["SeismoCallback"]


class SeismoCallback(Callback):
    """Monitor, diagnose and optionally guard a Lightning run (see the module docstring).

    Args: as :class:`seismo.integrations.huggingface.SeismoCallback`: ``store``, ``run_name``
    (default: the logger's name and version, else ``"lightning"``), ``config`` or MonitorConfig
    fields as keywords, ``diagnose``, ``alerts``, ``stop_on`` (sets ``trainer.should_stop``),
    ``guard="skip"`` and ``guard_config``, ``log_signals``, ``sinks``.

    The Monitor follows the first optimizer (``trainer.optimizers[0]``); with several, the update
    and Adam signals are those of the first one.
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
        self._active = False
        self._last_global_step = 0
        self._unlogged: list[Event] = []
        self._warned: set[str] = set()

    @property
    def monitor(self):
        """The :class:`seismo.Monitor` of the current (or last) run; None before train start."""
        return self.attached.monitor if self.attached is not None else None

    @property
    def guard(self):
        """The :class:`seismo.Guard` when ``guard="skip"``, else None."""
        return self.attached.guard if self.attached is not None else None

    # --- Lightning hooks -------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        if self._active:
            self._close("completed")
        self.attached = None
        self._unlogged = []
        if not trainer.optimizers:
            self._warn("attach", "seismo: SeismoCallback found no optimizer at train start; it is off")
            return
        if len(trainer.optimizers) > 1:
            self._warn("optimizers", f"seismo: {len(trainer.optimizers)} optimizers; update and Adam signals (and the Guard) "
                                     "follow the first one")
        try:
            self.attached = AttachedMonitor(
                pl_module, trainer.optimizers[0], self.options, start_step=trainer.global_step, run_name=_run_name(trainer),
                run_config=_hparams(pl_module), meta=_meta(pl_module, trainer),
            )
        except (ConfigError, StoreError):
            raise  # the user's input (a store that is not one, say): before the first step, one clear line
        except Exception as exc:  # noqa: BLE001 - a monitor failure never kills training: the callback is off, warned once
            self._warn("attach", f"seismo: SeismoCallback is off: building the Monitor raised {type(exc).__name__}: {exc}")
            return
        self._active = True
        self._last_global_step = trainer.global_step

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if not self._active:
            return
        try:
            self.attached.add_loss(loss)
        except Exception as exc:  # noqa: BLE001 - a monitor failure never kills training: the callback is off, warned once
            self._warn("step", f"seismo: SeismoCallback is off: reading the loss raised {type(exc).__name__}: {exc}")
            self._close("completed")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        a = self.attached
        if not self._active or a.guard is None:
            return
        try:
            if unwrap_optimizer(optimizer) is a.monitor.optimizer:
                a.grad_norm = grad_norm(a.monitor.optimizer)  # before Lightning clips
        except Exception as exc:  # noqa: BLE001 - a monitor failure never kills training: the callback is off, warned once
            self._warn("step", f"seismo: SeismoCallback is off: the gradient norm raised {type(exc).__name__}: {exc}")
            self._close("completed")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        a = self.attached if self._active else None
        if a is None or trainer.global_step == self._last_global_step:
            return  # no optimizer step in this batch (gradient accumulation): the loss keeps adding up
        step = a.monitor.step_count
        self._last_global_step = trainer.global_step
        try:
            a.end_step()
            new = a.take_events()
            every = max(int(getattr(trainer, "log_every_n_steps", 50) or 0), 0)
            log_now = every > 0 and (step + 1) % every == 0
            values = a.take_log_values() if log_now else {}
            new += a.take_events()
            self._unlogged += new
            if a.check_stop(new) is not None or a.gave_up is not None:
                trainer.should_stop = True
            if log_now:
                self._log(trainer, step, values)
        except Exception as exc:  # noqa: BLE001 - a monitor failure never kills training: the callback is off, warned once
            self._warn("step", f"seismo: SeismoCallback is off after step {step}: {type(exc).__name__}: {exc}")
            self._close("completed")

    def on_train_end(self, trainer, pl_module) -> None:
        if self._active:
            self._close("completed")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._active:
            self._close("interrupted" if isinstance(exception, KeyboardInterrupt) else "failed")

    # --- internals -------------------------------------------------------------------------------
    def _log(self, trainer, step: int, values: dict[str, float]) -> None:
        counts, text = self.attached.events_for_log(self._unlogged)
        self._unlogged = []
        metrics = {**values, **counts}
        for logger in trainer.loggers:
            if metrics:
                logger.log_metrics(metrics, step=step)
            add_text = getattr(getattr(logger, "experiment", None), "add_text", None) if text else None
            if callable(add_text):
                add_text("seismo/events", text, step)

    def _close(self, status: str) -> None:
        self._active = False
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


def _run_name(trainer: Any) -> str:
    logger = getattr(trainer, "logger", None)
    if logger is not None and getattr(logger, "name", None):
        version = getattr(logger, "version", None)
        return f"{logger.name}/version_{version}" if isinstance(version, int) else str(logger.name)
    return "lightning"


def _hparams(pl_module: Any) -> dict[str, Any]:
    try:
        return {"hparams": jsonable(dict(pl_module.hparams))}
    except Exception:  # noqa: BLE001 - the stored config is a convenience; the run goes on without it
        return {}


def _meta(pl_module: Any, trainer: Any) -> dict[str, Any]:
    return {"framework": "lightning", "framework_version": _lightning_version, "model_class": type(pl_module).__name__,
            "accumulate_grad_batches": getattr(trainer, "accumulate_grad_batches", None),
            "automatic_optimization": bool(getattr(pl_module, "automatic_optimization", True))}
