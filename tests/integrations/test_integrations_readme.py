"""The README's "Hugging Face Trainer" and "Lightning" examples run as written (offline)."""

from __future__ import annotations

import csv
import re
import warnings
from pathlib import Path

import pytest
import torch

from seismo.store import load_run

README = Path(__file__).resolve().parents[2] / "README.md"


def section_block(title: str) -> str:
    """The one python block of the README section ``## <title>``."""
    section = re.search(rf"^## {re.escape(title)}\n(.*?)^## ", README.read_text(), flags=re.S | re.M).group(1)
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, f"README section {title!r} should have one python example"
    return blocks[0]


def run_block(code: str, tmp_path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ns: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, str(README), "exec"), ns)  # noqa: S102 - our own README
    return ns


def test_readme_trainer_example(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    ns = run_block(section_block("Hugging Face Trainer"), tmp_path, monkeypatch)
    trainer, callback = ns["trainer"], ns["callback"]
    run = load_run(tmp_path / "runs" / "seismo.sqlite", "llama-hf")
    assert run.info.status == "completed"
    steps, losses = run.series("loss")
    assert list(steps) == list(range(1, 201))
    logged = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    assert sorted(logged) == list(range(10, 201, 10))
    for k, loss in logged.items():  # the Trainer logs the mean of the last 10 steps
        assert loss == pytest.approx(float(losses[k - 10:k].mean()), rel=1e-5)
    for i in range(2):
        assert len(run.series(f"attn/logit_max/model.layers.{i}.self_attn")[0]) == 200
    sent = [k for h in trainer.state.log_history for k in h if k.startswith("seismo/")]
    assert sent and all(k.startswith(("seismo/loss", "seismo/attn/logit_max", "seismo/events")) for k in sent)
    assert callback.monitor.run_id == run.info.run_id
    assert any(e["kind"] == "attention_logit_growth" for e in run.events)  # what the README promises


def test_readme_lightning_example(tmp_path, monkeypatch):
    pytest.importorskip("lightning")
    ns = run_block(section_block("Lightning"), tmp_path, monkeypatch)
    run = load_run(tmp_path / "runs" / "seismo.sqlite", "llama-pl")
    assert run.info.status == "completed" and run.info.meta["accumulate_grad_batches"] == 2
    assert list(run.series("loss")[0]) == list(range(200))
    metrics = ns["trainer"].logger.experiment.metrics_file_path
    with open(metrics) as f:
        rows = [r for r in csv.DictReader(f) if r.get("seismo/loss")]
    assert [int(r["step"]) for r in rows] == list(range(49, 200, 50))  # log_every_n_steps=50, Lightning's default
