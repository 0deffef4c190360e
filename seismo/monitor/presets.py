"""Probe presets: functions from options to a list of probes, cheapest first."""

from __future__ import annotations

from typing import Any

from seismo.errors import ConfigError
from seismo.monitor.activations import ActivationProbe
from seismo.monitor.adam import AdamProbe
from seismo.monitor.attention import AttentionProbe
from seismo.monitor.config import DEFAULT_CURVATURE_EVERY, MONITOR_PRESETS, MonitorConfig
from seismo.monitor.curvature_probe import CurvatureProbe
from seismo.monitor.gradients import GradientProbe, UpdateProbe
from seismo.monitor.logits import LogitsProbe
from seismo.monitor.loss import LossProbe
from seismo.monitor.probe import Probe
from seismo.monitor.tracking import every

__all__ = ["build_probes", "probes_for"]


def build_probes(preset: str = "default", every_n: int | None = None, **options: Any) -> list[Probe]:
    """Probes of a preset, cheapest first.

    - ``minimal``: loss and gradient norms, every step.
    - ``default``: + attention, output logits, activations every step; update norms and Adam
      state every 10 steps.
    - ``full``: everything every step (+ curvature when ``probe_loss`` is given, every
      ``curvature_every`` steps, 500 by default).

    ``every_n`` tracks every probe every N steps instead (curvature: every
    max(N, ``curvature_every``) steps). One Lanczos run costs about as much as 10-20 training
    steps, so every 500 steps keeps it near 2-4% of training time; sharpness drifts slowly
    except near the edge of stability, where a denser schedule (or an explicit
    ``CurvatureProbe``) is worth its cost. Options: ``output``, ``blocks``, ``attention_sample``,
    ``probe_loss``, ``curvature_every`` (see :class:`~seismo.monitor.config.MonitorConfig`).
    """
    if preset not in MONITOR_PRESETS:
        raise ConfigError(f"preset: unknown monitor preset {preset!r}; choose one of {MONITOR_PRESETS}")
    base = every(every_n) if every_n else every(1)
    slow = every(every_n) if every_n else every(10 if preset == "default" else 1)
    probes: list[Probe] = [LossProbe(schedule=base), GradientProbe(schedule=base)]
    if preset == "minimal":
        return probes
    probes += [
        AttentionProbe(schedule=base, max_batch=options.get("attention_sample", 2)),
        LogitsProbe(schedule=base, output=options.get("output")),
        ActivationProbe(schedule=base, blocks=options.get("blocks")),
        UpdateProbe(schedule=slow),
        AdamProbe(schedule=slow),
    ]
    if preset == "full" and options.get("probe_loss") is not None:
        curvature_every = options.get("curvature_every") or DEFAULT_CURVATURE_EVERY
        if not isinstance(curvature_every, int) or curvature_every < 1:
            raise ConfigError(f"curvature_every: must be a positive integer, got {curvature_every!r}")
        probes.append(CurvatureProbe(options["probe_loss"], schedule=every(max(every_n or 1, curvature_every))))
    return probes


def probes_for(config: MonitorConfig) -> list[Probe]:
    """The probes of ``config.preset`` with the config's options."""
    return build_probes(
        config.preset, config.every, output=config.output, blocks=config.blocks, attention_sample=config.attention_sample,
        probe_loss=config.probe_loss, curvature_every=config.curvature_every,
    )
