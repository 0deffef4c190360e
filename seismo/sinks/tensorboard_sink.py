"""``seismo.sinks.TensorBoard``: seismo's signals and events in TensorBoard event files.

Each flushed step becomes one TensorBoard ``Event`` holding one ``Summary`` with a scalar per
signal (no per-scalar call); events go to the text dashboard under ``seismo/events``, one
Markdown entry per event at the event's step. Writes are buffered by torch's ``FileWriter`` (a
background thread writes them) and reach the disk every ``flush_secs``, on ``flush()`` and on
``close()``.

Non-finite values: TensorBoard stores scalars as 32-bit floats, NaN and +-inf included
(values beyond float32's range become +-inf); its charts leave NaN out and mark it in the tooltip.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

from seismo.errors import ConfigError
from seismo.events import Event, Record
from seismo.sinks._base import EVENTS_TAG, BackendSink, event_markdown, missing_extra

__all__ = ["TensorBoard"]


class TensorBoard(BackendSink):
    """Write seismo's records and events to a TensorBoard log directory.

    Args:
        log_dir: the directory of the event file (created if missing); point ``tensorboard
            --logdir`` at it or at its parent.
        prefix: put in front of every signal name (e.g. ``"seismo/"``); events always go to
            ``seismo/events``.
        flush_secs: seconds between writes of the buffered events to disk.
        max_queue: events buffered before a write is forced.

    Example::

        from seismo.sinks import TensorBoard

        monitor = seismo.Monitor(model, optimizer, sinks=[TensorBoard("runs/tb/exp1")])
    """

    def __init__(self, log_dir: str | os.PathLike, *, prefix: str = "", flush_secs: float = 30.0, max_queue: int = 1000) -> None:
        super().__init__(prefix)
        if not isinstance(log_dir, (str, os.PathLike)) or not os.fspath(log_dir):
            raise ConfigError(f"log_dir must be a directory path, got {log_dir!r}")
        if not flush_secs > 0:
            raise ConfigError(f"flush_secs must be > 0, got {flush_secs!r}")
        if not isinstance(max_queue, int) or max_queue < 1:
            raise ConfigError(f"max_queue must be a positive integer, got {max_queue!r}")
        try:
            from tensorboard.compat.proto.summary_pb2 import Summary
            from torch.utils.tensorboard.summary import text
            from torch.utils.tensorboard.writer import FileWriter
        except ImportError as exc:
            raise missing_extra("TensorBoard", "tensorboard", "tb") from exc
        self._summary = Summary
        self._text = text
        self.log_dir = os.fspath(log_dir)
        self._writer = FileWriter(self.log_dir, max_queue=max_queue, flush_secs=flush_secs)

    def _write_records(self, records: Sequence[Record]) -> None:
        Summary, writer = self._summary, self._writer
        now = time.time()
        for step, record in records:
            values = [Summary.Value(tag=name, simple_value=v) for name, v in self.prefixed(record)]
            if values:
                writer.add_summary(Summary(value=values), int(step), now)

    def _write_events(self, events: Sequence[Event]) -> None:
        now = time.time()
        for event in events:
            summary = self._text(EVENTS_TAG, event_markdown(event))
            summary.value[0].tag = EVENTS_TAG  # torch names it "<tag>/text_summary"
            self._writer.add_summary(summary, int(event.step), now)

    def _flush(self) -> None:
        self._writer.flush()

    def _close(self) -> None:
        self._writer.close()  # flushes
