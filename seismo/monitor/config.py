"""``MonitorConfig``: the Monitor's options, checked when the config is built.

The shape of torchtitan's component configs: one dataclass next to the component it configures,
a docstring per field, validation in ``__post_init__`` raising :class:`~seismo.errors.ConfigError`
with the field's name, so that a bad setting fails before training starts.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

import torch.nn as nn
from torch import Tensor

from seismo.errors import ConfigError

__all__ = ["MonitorConfig", "MONITOR_PRESETS", "DEFAULT_CURVATURE_EVERY"]

#: Probe presets, cheapest first (see :func:`seismo.monitor.presets.build_probes`).
MONITOR_PRESETS = ("default", "full", "minimal")

#: Steps between curvature probes in the ``full`` preset: one Lanczos run costs about 10-20
#: training steps, so every 500 steps keeps it near 2-4% of training time.
DEFAULT_CURVATURE_EVERY = 500


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class MonitorConfig:
    """What the Monitor records and how often it moves values to the host."""

    preset: str = "default"
    """Probe preset: ``"minimal"`` (loss, gradient norms), ``"default"`` (+ attention, output logits,
    activations every step; update norms and Adam state every 10 steps) or ``"full"`` (everything
    every step, + curvature when ``probe_loss`` is given). Ignored when probes are passed explicitly."""

    every: int | None = None
    """Track every probe of the preset every N steps instead of the preset's own schedules."""

    flush_every: int = 50
    """Steps between host transfers (one transfer per flush; 1 for live displays)."""

    keep_history: bool = True
    """Keep every flushed value in ``Monitor.history`` (for ``series`` / ``latest``)."""

    output: str | None = None
    """Name of the module whose output holds the logits (default: the model's own output)."""

    blocks: list[str] | None = None
    """Names of the residual blocks for activation signals (default: found in the model)."""

    attention_sample: int = 2
    """Sequences of the batch the attention probe recomputes logits for."""

    probe_loss: Callable[[nn.Module], Tensor] | None = None
    """``f(model) -> loss`` on a fixed batch: enables the curvature probe of the ``full`` preset."""

    curvature_every: int = DEFAULT_CURVATURE_EVERY
    """Steps between curvature probes of the ``full`` preset (with ``every``: max of the two)."""

    start_step: int = 0
    """Number of the first step recorded (a resumed run continues its numbering)."""

    def __post_init__(self) -> None:
        if self.preset not in MONITOR_PRESETS:
            raise ConfigError(f"MonitorConfig.preset: unknown monitor preset {self.preset!r}; choose one of {MONITOR_PRESETS}")
        if self.every is not None and not _positive_int(self.every):
            raise ConfigError(f"MonitorConfig.every: must be a positive integer or None, got {self.every!r}")
        if not _positive_int(self.flush_every):
            raise ConfigError(f"MonitorConfig.flush_every: must be a positive integer, got {self.flush_every!r}")
        if not isinstance(self.keep_history, bool):
            raise ConfigError(f"MonitorConfig.keep_history: must be True or False, got {self.keep_history!r}")
        if self.output is not None and (not isinstance(self.output, str) or not self.output):
            raise ConfigError(f"MonitorConfig.output: must be a module name or None, got {self.output!r}")
        if self.blocks is not None:
            if isinstance(self.blocks, str) or not all(isinstance(b, str) and b for b in self.blocks):
                raise ConfigError(f"MonitorConfig.blocks: must be a list of module names or None, got {self.blocks!r}")
            self.blocks = list(self.blocks)
        if not _positive_int(self.attention_sample):
            raise ConfigError(f"MonitorConfig.attention_sample: must be a positive integer, got {self.attention_sample!r}")
        if self.probe_loss is not None and not callable(self.probe_loss):
            raise ConfigError(f"MonitorConfig.probe_loss: must be a callable model -> loss, got {type(self.probe_loss).__name__}")
        if not _positive_int(self.curvature_every):
            raise ConfigError(f"MonitorConfig.curvature_every: must be a positive integer, got {self.curvature_every!r}")
        if not isinstance(self.start_step, int) or isinstance(self.start_step, bool) or self.start_step < 0:
            raise ConfigError(f"MonitorConfig.start_step: must be an integer >= 0, got {self.start_step!r}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
