"""``seismo.Monitor``, the facade: ``diagnose=True`` runs the detectors as a record sink and their
events reach the run store, ``monitor.events``, ``on_event`` and the alert printer, as before the
Monitor was split from the detectors."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.console import Console

import seismo
import seismo.monitor
from seismo.diagnose import Diagnoser
from seismo.diagnose.engine import AlertPrinter
from seismo.errors import ConfigError
from seismo.store import load_run

SPIKES = (40, 45)


def spiky_run(mon: seismo.Monitor, steps: int = 60) -> list[float]:
    """An MLP fit with two hand-made loss spikes (x50 at ``SPIKES``); returns the loop's own losses."""
    torch.manual_seed(0)
    model, opt = mon.model, mon.optimizer
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    losses = []
    for step in range(steps):
        loss = F.cross_entropy(model(x), y) * (50 if step in SPIKES else 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(loss)
        losses.append(float(loss.detach()))
    mon.close()
    return losses


def mlp_and_opt():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


def test_seismo_monitor_is_the_facade_over_the_plain_monitor():
    assert seismo.Monitor is seismo.session.Monitor and issubclass(seismo.Monitor, seismo.monitor.Monitor)
    assert seismo.Monitor is not seismo.monitor.Monitor


def test_diagnose_true_records_events_to_the_store_as_before(tmp_path):
    path = tmp_path / "runs.sqlite"
    seen: list = []
    mon = seismo.Monitor(*mlp_and_opt(), store=str(path), run_name="spiky", probes="minimal", flush_every=5,
                         diagnose=True, on_event=seen.extend)
    assert isinstance(mon.diagnoser, Diagnoser) and mon.diagnoser in mon.sinks
    losses = spiky_run(mon)
    assert [losses[s] > 10 * losses[s - 1] for s in SPIKES] == [True, True]  # the spikes the detector must name
    spikes = [e.step for e in mon.events if e.kind == "loss_spike"]
    assert spikes == list(SPIKES)
    stored = load_run(path, "spiky").events
    assert [(e["step"], e["kind"], e["message"]) for e in stored] == [(e.step, e.kind, e.message) for e in mon.events]
    assert seen == mon.events
    assert load_run(path, "spiky").info.status == "completed"


def test_default_alert_printer_is_an_event_sink_and_prints():
    console = Console(file=io.StringIO(), width=200)
    mon = seismo.Monitor(*mlp_and_opt(), probes="minimal", flush_every=5, diagnose=Diagnoser(), alerts=AlertPrinter(console, quiet_steps=1))
    spiky_run(mon)
    printed = console.file.getvalue().splitlines()
    shown = [e for e in mon.events if e.severity != "info"]  # the printer's default min_severity is "warning"
    assert any(e.step in SPIKES for e in shown)
    headlines = [line for line in printed if line.startswith("seismo ")]
    assert headlines == [f"seismo {e.severity} at step {e.step}: {e.kind} {e.message}" for e in shown]
    # alerts=True builds the default printer; alerts=False none; no diagnose, no printer
    assert any(isinstance(s, AlertPrinter) for s in seismo.Monitor(*mlp_and_opt(), diagnose=True, probes="minimal").sinks)
    assert not any(isinstance(s, AlertPrinter) for s in seismo.Monitor(*mlp_and_opt(), diagnose=True, alerts=False, probes="minimal").sinks)
    assert not any(isinstance(s, AlertPrinter) for s in seismo.Monitor(*mlp_and_opt(), probes="minimal").sinks)


def test_without_diagnose_there_are_no_events():
    mon = seismo.Monitor(*mlp_and_opt(), probes="minimal", flush_every=5)
    assert mon.diagnoser is None
    spiky_run(mon)
    assert mon.events == [] and len(mon.series("loss")[0]) == 60


def test_bad_diagnose_and_on_event_are_config_errors():
    with pytest.raises(ConfigError, match=r"^diagnose: must be True, False or a seismo.diagnose.Diagnoser, got str$"):
        seismo.Monitor(*mlp_and_opt(), diagnose="yes")
    with pytest.raises(ConfigError, match=r"^on_event: must be a callable"):
        seismo.Monitor(*mlp_and_opt(), diagnose=True, on_event=3)
