"""``seismo.sinks.MLflow``: seismo's signals and events in an MLflow run.

Each flush is one ``MlflowClient.log_batch`` call per 1,000 values (MLflow's limit per
request) with every value of every step in the batch, sent by default from MLflow's background
logging thread (``synchronous=False``): the training thread only queues them, and waits for the
previous flush's batches before queueing new ones (so a slow store slows training down instead
of piling up data, and a failed batch is reported, by one warning, one flush later at most); events are kept as run artifacts,
``seismo/events.json`` (one object per event: step, kind, severity, module, message, advice,
evidence) and ``seismo/events.txt`` (one line per event), rewritten when new events come, and a
run tag ``seismo.events`` says how many there are and which came last.

Names: seismo's names as they are (``grad/norm``, ``attn/logit_max/transformer.h.0.attn``),
except on MLflow's file store, which keeps each metric in a file at the path of its name: there
``grad/norm`` (a file) and ``grad/norm/lm_head`` (a file in a folder of the same name) cannot
both exist, so on a file store the sink writes ``/`` as ``.`` (``grad.norm.lm_head``). MLflow
accepts letters, digits, ``_ - . : /`` and spaces in names; any other character becomes ``_``.

Non-finite values: sent as they are. The file store keeps NaN and +-inf; the SQL stores (the
default ``sqlite:///mlflow.db`` of MLflow 3) keep NaN and store +-inf as +-1.797e308 (the
largest double), which is what a read gives back.
"""

from __future__ import annotations

import re
import time
from typing import Any, Sequence
from urllib.parse import urlparse

from seismo._io import dumps_json
from seismo.errors import ConfigError
from seismo.events import Event, Record
from seismo.sinks._base import EVENT_COLUMNS, EVENTS_TAG, BackendSink, event_line, event_row, missing_extra

__all__ = ["MLflow"]

_MAX_PER_BATCH = 1000  # mlflow.utils.validation.MAX_METRICS_PER_BATCH
_MAX_TAG = 5000  # below MLflow's 8,000-character tag limit (older servers: 5,000)
_BAD_NAME_CHARS = re.compile(r"[^\w\-. :/]")
#: seismo's run status -> MLflow's, for a run the sink started (a diverged run ran to its end: FINISHED).
_RUN_STATUS = {"completed": "FINISHED", "diverged": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


class MLflow(BackendSink):
    """Log seismo's records and events to an MLflow run.

    Args:
        experiment: name of the experiment to create the run in (created if missing). None: log
            into the active run (``mlflow.active_run()``) if there is one, else experiment "seismo".
            A run the sink creates ends with the status the caller set (``set_status``: completed
            and diverged as FINISHED, failed as FAILED, interrupted as KILLED) and gets the tag
            ``seismo.status``.
        run_id: log into this existing run instead (it is left open by :meth:`close`).
        run_name: name of the run the sink creates.
        tracking_uri: where MLflow keeps runs (``sqlite:///mlflow.db``, ``http://host:5000``,
            ``file:/path`` with ``MLFLOW_ALLOW_FILE_STORE=true`` on MLflow 3); None: MLflow's default.
        prefix: put in front of every signal name (e.g. ``"seismo/"``).
        synchronous: False (default): batches go through MLflow's background thread (``flush()``
            and ``close()`` wait for them); True: each ``log_batch`` returns when it is stored.

    Example::

        from seismo.sinks import MLflow

        sink = MLflow(experiment="seismo", run_name="exp1", tracking_uri="sqlite:///mlflow.db")
        monitor = seismo.Monitor(model, optimizer, sinks=[sink])
    """

    def __init__(self, experiment: str | None = None, *, run_id: str | None = None, run_name: str | None = None,
                 tracking_uri: str | None = None, prefix: str = "", synchronous: bool = False) -> None:
        super().__init__(prefix)
        for field, value in (("experiment", experiment), ("run_id", run_id), ("run_name", run_name), ("tracking_uri", tracking_uri)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"{field} must be a non-empty string or None, got {value!r}")
        try:
            import mlflow
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise missing_extra("MLflow", "mlflow", "mlflow") from exc
        self._metric = Metric
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._owns_run = False
        if run_id is None and experiment is None and tracking_uri is None and mlflow.active_run() is not None:
            run_id = mlflow.active_run().info.run_id
        if run_id is not None:
            self.run_id = self.client.get_run(run_id).info.run_id  # fails here if there is no such run
        else:
            name = experiment or "seismo"
            found = self.client.get_experiment_by_name(name)
            experiment_id = found.experiment_id if found is not None else self.client.create_experiment(name)
            self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags={"seismo": "1"}).info.run_id
            self._owns_run = True
        #: "/" in seismo's names becomes this (see the module docstring: "." on a file store).
        self.separator = "." if urlparse(str(self.client.tracking_uri)).scheme in ("", "file") else "/"
        self.synchronous = bool(synchronous)
        self._pending: list[Any] = []
        self._events: list[dict[str, Any]] = []
        self._lines: list[str] = []
        self._names: dict[str, str] = {}

    def _name(self, name: str) -> str:
        safe = self._names.get(name)
        if safe is None:
            safe = self._names[name] = _BAD_NAME_CHARS.sub("_", name).replace("/", self.separator)
        return safe

    def _write_records(self, records: Sequence[Record]) -> None:
        Metric, name_of = self._metric, self._name
        ms = int(time.time() * 1000)
        metrics = [Metric(name_of(name), v, ms, int(step)) for step, record in records for name, v in self.prefixed(record)]
        self._flush()  # the previous flush's batches: done by now unless the store is slow
        for i in range(0, len(metrics), _MAX_PER_BATCH):
            chunk = metrics[i : i + _MAX_PER_BATCH]
            if self.synchronous:
                self.client.log_batch(self.run_id, metrics=chunk)
            else:
                self._pending.append(self.client.log_batch(self.run_id, metrics=chunk, synchronous=False))

    def _write_events(self, events: Sequence[Event]) -> None:
        for event in events:
            row = event_row(event)
            row[-1] = event.evidence
            self._events.append(dict(zip(EVENT_COLUMNS, row)))
            self._lines.append(event_line(event))
        self.client.log_text(self.run_id, dumps_json(self._events, indent=1), f"{EVENTS_TAG}.json")
        self.client.log_text(self.run_id, "\n".join(self._lines) + "\n", f"{EVENTS_TAG}.txt")
        self.client.set_tag(self.run_id, "seismo.events", f"{len(self._events)} events; last: {self._lines[-1]}"[:_MAX_TAG])

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for op in pending:
            op.wait()

    def _set_status(self, status: str, meta: Any) -> None:
        self.client.set_tag(self.run_id, "seismo.status", status)

    def _close(self) -> None:
        self._flush()
        if self._owns_run:
            self.client.set_terminated(self.run_id, status=_RUN_STATUS.get(self.status or "completed", "FINISHED"))
