"""A tiny monitored run that feeds the sinks under test, and the run store's copy of it.

The run: a one-layer TinyGPT (so attention signals carry dotted module names) trained with AdamW
under ``seismo.Monitor(..., store=..., diagnose=True, sinks=[...])``. The loss reported to the
monitor gets a 50x spike at step 40 and a NaN at step 70, so the detectors emit events and a
non-finite value reaches the sinks. The SQLite run store, the source of truth, is the reference
each backend is read back against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import seismo
from seismo.events import Event
from seismo.proxy.model import GPTConfig, TinyGPT
from seismo.store import RunStore

STEPS = 90
SPIKE_STEP, NAN_STEP = 40, 70


@dataclass
class StoredRun:
    """What the run store has for the run: every (step, value) per signal and every event."""

    series: dict[str, dict[int, float]]
    events: list[dict]


def run_monitored(store_path, sinks) -> StoredRun:
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.randint(0, 32, (8, 17))
    monitor = seismo.Monitor(model, optimizer, store=str(store_path), run_name="sinks", diagnose=True, alerts=False,
                             flush_every=25, sinks=sinks)
    for step in range(STEPS):
        _, loss = model(data[:, :-1], data[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        reported = loss.detach() * (50.0 if step == SPIKE_STEP else 1.0)
        if step == NAN_STEP:
            reported = torch.tensor(math.nan)
        monitor.step(reported)
    monitor.close()  # closes the sinks
    for sink in sinks:  # neither dropped by the Monitor (it raised) nor turned off by itself (a backend call failed)
        assert sink in monitor.sinks and getattr(sink, "disabled", None) is None, getattr(sink, "disabled", sink)
    with RunStore(store_path) as store:
        run_id = store.find_run("sinks").run_id
        series = {name: dict(zip(steps.tolist(), values.tolist())) for name, (steps, values) in store.all_series(run_id).items()}
        events = store.events(run_id)
    return StoredRun(series, events)


@pytest.fixture
def monitored_run(tmp_path, one_torch_thread):
    """``run(sinks) -> StoredRun``: the tiny run above, fanned out to ``sinks``."""
    return lambda sinks: run_monitored(tmp_path / "seismo.sqlite", sinks)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B in offline mode with every file of the test under tmp_path/wb; no network, no login."""
    wandb = pytest.importorskip("wandb")
    for var, sub in (("WANDB_DIR", ""), ("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"),
                     ("WANDB_ARTIFACT_DIR", "artifacts")):
        (tmp_path / "wb" / sub).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(var, str(tmp_path / "wb" / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    wandb.teardown()  # W&B keeps the settings of its first run in a process-wide singleton
    yield tmp_path / "wb"
    if wandb.run is not None:
        wandb.run.finish()
    wandb.teardown()


def sample_events() -> list[Event]:
    """Events with every field set, including strings a renderer could misread."""
    return [
        Event("loss_spike", "warning", 3, "", "loss 5.1 is 9.0 MADs above its level", {"zscore": 9.0, "value": 5.1},
              "lower the learning rate"),
        Event("attention_logit_growth", "critical", 3, "transformer.h.0.attn", "max logit <b>1e4</b> | `x` * 2",
              {"value": math.inf}, "add qk-layernorm (arXiv:2309.14322)"),
        Event("nonfinite", "critical", 7, "", "loss is nan", {}, ""),
    ]
