"""Spikes that several runs share: when runs see the same data in the same order, a loss spike at
the same step in each of them comes from the data (a hard or corrupt batch), not from the run's
own dynamics. PaLM (arXiv 2204.02311, §5.1) found its spikes this way: replaying the same batches
from a nearby checkpoint reproduced them, other batches did not."""

from __future__ import annotations

from typing import Mapping, Sequence

from seismo.diagnose.replay import History, replay_events
from seismo.diagnose.spikes import SpikeDetector
from seismo.events import Event

__all__ = ["spike_onsets", "attribute_shared_spikes"]

SPIKE_KINDS = ("loss_spike", "loss_divergence")


def spike_onsets(history: History, signal: str = "loss") -> list[int]:
    """Onset steps of the loss spikes (any severity) in a recorded history, by the default rule."""
    if signal not in history:
        return []
    det = SpikeDetector("loss_spike", signal, z=4.5, rel=0.02, persist=50, triage=True)
    return sorted({e.step for e in replay_events({signal: history[signal]}, [det])})


def attribute_shared_spikes(events: Sequence[Event], others: Mapping[str, History], tolerance: int = 1,
                            signal: str = "loss") -> list[dict]:
    """For each loss spike in ``events``, the runs of ``others`` (``{run name: history}``, runs that
    saw the same data order) with a spike within ``tolerance`` steps. Spikes found in at least one
    other run are marked in place (``evidence["shared_with"]``, ``evidence["cause"] = "data"``) and
    returned as ``{"step", "kind", "severity", "runs"}``."""
    onsets = {name: spike_onsets(h, signal) for name, h in others.items()}
    shared = []
    for e in events:
        if e.kind not in SPIKE_KINDS:
            continue
        runs = [name for name, steps in onsets.items() if any(abs(s - e.step) <= tolerance for s in steps)]
        if runs:
            e.evidence["shared_with"] = runs
            e.evidence["cause"] = "data"
            e.message += f"; the same step spiked in {', '.join(runs)}: caused by the data (a batch), not the run"
            shared.append({"step": e.step, "kind": e.kind, "severity": e.severity, "runs": runs})
    return shared
