"""Diagnosis of stored runs, live detection through the Monitor, and `seismo diagnose`."""

import json

import pytest
import torch

from seismo.cli import main
from seismo.diagnose import diagnose_run
from seismo.proxy.presets import tiny
from seismo.proxy.train import train


@pytest.fixture(scope="module")
def unstable_run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs")
    cfg = tiny()
    cfg.steps, cfg.optim.lr, cfg.optim.warmup_steps = 80, 0.3, 5
    cfg.out_dir, cfg.store, cfg.run_name = str(out / "hot"), str(out / "seismo.sqlite"), "hot"
    return train(cfg)


def test_live_events_are_stored_and_match_replay(unstable_run):
    r = unstable_run
    kinds = {e.kind for e in r.events}
    assert "attention_logit_growth" in kinds
    stored = diagnose_run(r.store, r.run_id, replay=False)
    replay = diagnose_run(r.store, r.run_id, replay=True)
    # the events written live are exactly what replaying the stored signals finds
    assert [(e.kind, e.step, e.module) for e in stored.events] == [(e.kind, e.step, e.module) for e in replay.events]
    assert replay.cause_kind == "attention_logit_growth"
    assert replay.recommendations[0]["name"] == "qk-layernorm"


def test_cli_diagnose_text_and_json(unstable_run, capsys):
    r = unstable_run
    assert main(["diagnose", str(r.run_id), "--store", r.store]) == 0
    text = capsys.readouterr().out
    assert "Likely cause: attention logits grew" in text
    assert "qk-layernorm" in text and "seismo.mitigate.QKNorm" in text
    assert main(["diagnose", "hot", "--store", r.store, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["cause_kind"] == "attention_logit_growth"
    assert any(e["kind"] == "attention_logit_growth" and e["module"].endswith(".attn") for e in data["events"])


def test_cli_diagnose_bad_input(tmp_path, capsys, unstable_run):
    assert main(["diagnose", "1", "--store", str(tmp_path / "nope.sqlite")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run store" in err
    assert main(["diagnose", "no-such-run", "--store", unstable_run.store]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_monitor_runs_detectors_live_and_rate_limits_alerts(capsys):
    from rich.console import Console

    from seismo import Monitor
    from seismo.diagnose.engine import AlertPrinter

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    console = Console(file=__import__("io").StringIO(), width=200)
    printer = AlertPrinter(console, quiet_steps=1000)
    mon = Monitor(model, opt, probes="minimal", diagnose=True, on_event=printer, flush_every=5)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    for step in range(60):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if step in (40, 45):  # two separate loss spikes (the second is within the quiet period)
            loss = loss * 50
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(loss)
    mon.close()
    spikes = [e for e in mon.events if e.kind == "loss_spike"]
    assert [(e.step, e.severity) for e in spikes] == [(40, "info"), (45, "info")]  # one-step outliers, back at once
    assert [e.evidence["steps_to_recover"] for e in spikes] == [1, 1] and not any(e.advice for e in spikes)
    printed = console.file.getvalue()
    assert "loss_spike" not in printed  # the printer shows warnings and above by default
    assert printed.count("grad_spike") == 1  # the gradient spiked with the loss; the second one was held back
