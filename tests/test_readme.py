"""The README's code runs as written (with a small model and loader supplied)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_monitor_snippet_runs(tmp_path, monkeypatch):
    blocks = python_blocks()
    assert blocks, "the README has no python example"
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = [(torch.randn(16, 8), torch.randint(0, 3, (16,))) for _ in range(12)]
    ns = {"model": model, "optimizer": optimizer, "loader": loader, "loss_fn": torch.nn.functional.cross_entropy}
    exec(compile(blocks[0], str(README), "exec"), ns)  # noqa: S102 - our own README
    monitor = ns["monitor"]
    assert monitor.step_count == 12
    from seismo.report import load_run

    run = load_run(tmp_path / "runs" / "seismo.sqlite", "exp1")
    steps, values = run.series("grad/norm")
    assert len(steps) == 12 and (values > 0).all()
    assert run.info.status == "completed"
