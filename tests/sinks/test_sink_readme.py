"""The README's "Sinks" examples run as written, each in a fresh interpreter (so an import the
example forgot fails), with a small model and loader supplied; offline."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_sink_mlflow import read_back as mlflow_read_back
from test_sink_tensorboard import read_back as tensorboard_read_back
from test_sink_wandb import read_back as wandb_read_back

README = Path(__file__).resolve().parents[2] / "README.md"


def sinks_blocks() -> dict[str, str]:
    """The python blocks of the README's "## Sinks" section, keyed by the sink they build."""
    section = re.search(r"^## Sinks\n(.*?)^## ", README.read_text(), flags=re.S | re.M).group(1)
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return {re.search(r"from seismo\.sinks import (\w+)", b).group(1): b for b in blocks}


PRELUDE = """
import torch
torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
loader = [(torch.randn(16, 8), torch.randint(0, 3, (16,))) for _ in range(12)]
loss_fn = torch.nn.functional.cross_entropy
"""
EPILOGUE = """
assert monitor.step_count == 12
print(getattr(sink, "run_id", ""))
"""


def run_block(code: str, cwd) -> str:
    """Run the example after PRELUDE in a new interpreter in ``cwd``; returns what it printed last."""
    out = subprocess.run([sys.executable, "-c", PRELUDE + code + EPILOGUE], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


def test_the_readme_has_one_example_per_sink():
    assert sorted(sinks_blocks()) == ["MLflow", "TensorBoard", "WandB"]


def test_tensorboard_example(tmp_path):
    run_block(sinks_blocks()["TensorBoard"], tmp_path)
    scalars, _ = tensorboard_read_back(tmp_path / "runs" / "tb" / "exp1")
    assert len(scalars["grad/norm"]) == 12 and len(scalars["loss"]) == 12


def test_wandb_example(offline):
    run_block(sinks_blocks()["WandB"], offline)
    metrics, _, _ = wandb_read_back(offline)
    assert len(metrics["grad/norm"]) == 12 and len(metrics["loss"]) == 12


def test_mlflow_example(tmp_path):
    pytest.importorskip("sqlalchemy")
    run_id = run_block(sinks_blocks()["MLflow"], tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    metrics, _, _, _ = mlflow_read_back(uri, run_id, tmp_path / "artifacts")
    assert len(metrics["grad/norm"]) == 12 and len(metrics["loss"]) == 12
