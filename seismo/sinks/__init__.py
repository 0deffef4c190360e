"""Sinks that send seismo's signals and events to TensorBoard, Weights & Biases and MLflow.

Each implements both Protocols of :mod:`seismo.events`: ``write_records(records)`` once per
flush with the whole batch, ``write_events(events)``, ``flush()`` and ``close()``. Give them to
``seismo.Monitor(..., sinks=[...])``. Each library is imported when its sink is built, so
seismo does not need it otherwise (extras ``tb``, ``wandb``, ``mlflow``). A failing backend
call never raises into training: the sink warns once and turns itself off. See docs/SINKS.md.
"""

from seismo.sinks.mlflow_sink import MLflow
from seismo.sinks.tensorboard_sink import TensorBoard
from seismo.sinks.wandb_sink import WandB

__all__ = ["TensorBoard", "WandB", "MLflow"]
