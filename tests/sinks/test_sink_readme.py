"""The README's "Sinks" examples run as written (a small model and loader supplied), offline."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from test_sink_mlflow import read_back as mlflow_read_back
from test_sink_tensorboard import read_back as tensorboard_read_back
from test_sink_wandb import read_back as wandb_read_back

README = Path(__file__).resolve().parents[2] / "README.md"


def sinks_blocks() -> dict[str, str]:
    """The python blocks of the README's "## Sinks" section, keyed by the sink they build."""
    section = re.search(r"^## Sinks\n(.*?)^## ", README.read_text(), flags=re.S | re.M).group(1)
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return {re.search(r"seismo\.sinks\.(\w+)\(", b).group(1): b for b in blocks}


def run_block(code: str) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = [(torch.randn(16, 8), torch.randint(0, 3, (16,))) for _ in range(12)]
    ns = {"model": model, "optimizer": optimizer, "loader": loader, "loss_fn": torch.nn.functional.cross_entropy}
    exec(compile(code, str(README), "exec"), ns)  # noqa: S102 - our own README
    assert ns["monitor"].step_count == 12
    return ns


def test_the_readme_has_one_example_per_sink():
    assert sorted(sinks_blocks()) == ["MLflow", "TensorBoard", "WandB"]


def test_tensorboard_example(tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.chdir(tmp_path)
    run_block(sinks_blocks()["TensorBoard"])
    scalars, _ = tensorboard_read_back(tmp_path / "runs" / "tb" / "exp1")
    assert len(scalars["grad/norm"]) == 12 and len(scalars["loss"]) == 12


def test_wandb_example(offline, monkeypatch, one_torch_thread):
    monkeypatch.chdir(offline)
    run_block(sinks_blocks()["WandB"])
    metrics, _, _ = wandb_read_back(offline)
    assert len(metrics["grad/norm"]) == 12 and len(metrics["loss"]) == 12


def test_mlflow_example(tmp_path, monkeypatch, one_torch_thread):
    pytest.importorskip("sqlalchemy")
    monkeypatch.chdir(tmp_path)
    ns = run_block(sinks_blocks()["MLflow"])
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    metrics, _, _, _ = mlflow_read_back(uri, ns["sink"].run_id, tmp_path / "artifacts")
    assert len(metrics["grad/norm"]) == 12 and len(metrics["loss"]) == 12
