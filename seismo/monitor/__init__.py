"""Stability signals from any PyTorch training loop. See :class:`Monitor` and docs/MONITOR.md."""

from seismo.monitor.activations import ActivationProbe
from seismo.monitor.adam import AdamProbe
from seismo.monitor.adam_staleness import AdamStalenessProbe
from seismo.monitor.attention import AttentionLogitTap, AttentionProbe
from seismo.monitor.config import MONITOR_PRESETS, MonitorConfig
from seismo.monitor.fanout import SinkFanout
from seismo.monitor.gradients import GradientProbe, UpdateProbe
from seismo.monitor.logits import LogitsProbe
from seismo.monitor.loss import LossProbe
from seismo.monitor.monitor import PRESETS, Monitor
from seismo.monitor.outliers import OutlierProbe
from seismo.monitor.presets import build_probes
from seismo.monitor.probe import HookedProbe, Probe, ProbeContext, ProbeFailure
from seismo.monitor.tracking import every, log_spaced

__all__ = [
    "Monitor", "MonitorConfig", "build_probes", "MONITOR_PRESETS", "PRESETS", "SinkFanout",
    "Probe", "HookedProbe", "ProbeContext", "ProbeFailure", "every", "log_spaced", "AttentionLogitTap",
    "LossProbe", "GradientProbe", "UpdateProbe", "AdamProbe", "AttentionProbe", "LogitsProbe", "ActivationProbe",
    "OutlierProbe", "AdamStalenessProbe",
]
