"""Stability signals from any PyTorch training loop. See :class:`Monitor` and docs/MONITOR.md."""

from seismo.monitor.activations import ActivationProbe
from seismo.monitor.adam import AdamProbe
from seismo.monitor.attention import AttentionProbe
from seismo.monitor.gradients import GradientProbe, UpdateProbe
from seismo.monitor.logits import LogitsProbe
from seismo.monitor.loss import LossProbe
from seismo.monitor.monitor import PRESETS, Monitor, build_probes
from seismo.monitor.probe import Probe, ProbeFailure
from seismo.monitor.schedules import every, log_spaced

__all__ = [
    "Monitor", "build_probes", "PRESETS", "Probe", "ProbeFailure", "every", "log_spaced",
    "LossProbe", "GradientProbe", "UpdateProbe", "AdamProbe", "AttentionProbe", "LogitsProbe", "ActivationProbe",
]
