"""``seismo.sinks.WandB``: seismo's signals and events in a Weights & Biases run.

Each flushed step is one ``run.log(dict, step=step)`` call with every signal of that step (W&B
queues it and a background process sends it); events go to a ``wandb.Table`` under
``seismo/events`` with one row per event (step, kind, severity, module, message, advice,
evidence), logged in incremental mode so each log sends only the new rows.

Steps: by default W&B's own step is seismo's step. W&B drops a ``log`` at a step lower than one
it has already seen, so in a run that something else also logs to with its own counter (e.g.
the Hugging Face ``WandbCallback``), pass ``step_metric="seismo/step"``: the sink then logs
without ``step=``, adds ``seismo/step`` to every row and declares it as the x-axis of seismo's
signals (``define_metric``).

Non-finite values: sent as they are. W&B records NaN and +-inf in the run history (as the JSON
values ``NaN``/``Infinity``, read back as floats); its charts leave them out.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

from seismo.errors import ConfigError
from seismo.events import Event, Record
from seismo.sinks._base import EVENT_COLUMNS, EVENTS_TAG, BackendSink, event_row, missing_extra

__all__ = ["WandB"]


class WandB(BackendSink):
    """Log seismo's records and events to a W&B run.

    Args:
        project: project of the run to start when there is no run to use.
        run: a run to log into (e.g. ``wandb.init(...)``'s result). None: the active run
            (``wandb.run``) if there is one, else ``wandb.init(project=project, **init_kwargs)``.
            Only a run the sink started is finished by :meth:`close`.
        prefix: put in front of every signal name (e.g. ``"seismo/"``).
        step_metric: None (log at ``step=`` seismo's step) or a name for seismo's step as a
            metric of its own (see the module docstring).
        init_kwargs: passed to ``wandb.init`` (``name``, ``config``, ``mode``, ``dir``, ...).

    Example::

        from seismo.sinks import WandB

        sink = WandB(project="my-project", name="exp1")
        monitor = seismo.Monitor(model, optimizer, sinks=[sink])
    """

    def __init__(self, project: str | None = None, *, run: Any = None, prefix: str = "", step_metric: str | None = None,
                 **init_kwargs: Any) -> None:
        super().__init__(prefix)
        if project is not None and not isinstance(project, str):
            raise ConfigError(f"project must be a string, got {type(project).__name__}")
        if step_metric is not None and (not isinstance(step_metric, str) or not step_metric):
            raise ConfigError(f"step_metric must be a non-empty string or None, got {step_metric!r}")
        try:
            import wandb
        except ImportError as exc:
            raise missing_extra("WandB", "wandb", "wandb") from exc
        self._wandb = wandb
        self._owns_run = False
        if run is None:
            run = wandb.run
        if run is None:
            run = wandb.init(project=project, **init_kwargs)
            self._owns_run = True
        elif init_kwargs or project is not None:
            warnings.warn("seismo: WandB sink logs into an existing run; project and init arguments are ignored",
                          RuntimeWarning, stacklevel=2)
        self.run = run
        self.step_metric = step_metric
        self._declared: set[str] = set()
        # W&B's step is seismo's unless step_metric is set; a run found may be past seismo's first steps.
        self._last_step = int(getattr(run, "step", 0) or 0) if step_metric is None else -1
        self._dropped = 0
        try:
            self._table = wandb.Table(columns=list(EVENT_COLUMNS), log_mode="INCREMENTAL")
            self._incremental = True
        except TypeError:  # wandb < 0.20 has no incremental tables: log the whole table each time
            self._table = wandb.Table(columns=list(EVENT_COLUMNS))
            self._incremental = False
        if step_metric is not None:
            run.define_metric(step_metric)
            run.define_metric(EVENTS_TAG, step_metric=step_metric)

    def _declare(self, names: Sequence[str]) -> None:
        new = [n for n in names if n not in self._declared]
        for name in new:  # once per signal name, not per step
            self.run.define_metric(name, step_metric=self.step_metric)
            self._declared.add(name)

    def _write_records(self, records: Sequence[Record]) -> None:
        log = self.run.log
        for step, record in records:
            step = int(step)
            row = dict(self.prefixed(record))
            if not row:
                continue
            if self.step_metric is not None:
                self._declare(list(row))
                row[self.step_metric] = step
                log(row)
            elif step < self._last_step:  # W&B would drop it with a warning per call
                self._dropped += 1
                if self._dropped == 1:
                    warnings.warn(f"seismo: WandB sink drops step {step}: the run is already at step {self._last_step} "
                                  "(W&B steps only increase; use step_metric='seismo/step')", RuntimeWarning, stacklevel=4)
                continue
            else:
                log(row, step=step)
            self._last_step = max(self._last_step, step)

    def _write_events(self, events: Sequence[Event]) -> None:
        wandb = self._wandb
        if not self._incremental:
            self._table = wandb.Table(columns=list(EVENT_COLUMNS), data=[*self._table.data])
        for event in events:
            self._table.add_data(*event_row(event))
        # Events come after the records of their flush: log them with the last logged step (W&B
        # steps only increase); each row keeps the event's own step.
        step = max([self._last_step] + [int(e.step) for e in events])
        if self.step_metric is not None:
            self.run.log({EVENTS_TAG: self._table, self.step_metric: step})
        else:
            self.run.log({EVENTS_TAG: self._table}, step=step)
        self._last_step = step

    def _close(self) -> None:
        if self._owns_run:  # a failed or interrupted run is marked failed in W&B (exit code 1)
            self.run.finish(exit_code=1 if self.status in ("failed", "interrupted") else 0)
