"""The Monitor under DistributedDataParallel: 2 CPU processes with gloo.

Each rank trains the same small model on its half of a fixed batch. DDP averages the gradients,
so the gradient the optimizer sees is the full-batch gradient; the ``grad/norm`` the Monitor
records (read in the optimizer's pre-step hook under DDP) must equal the single-process norm on
the full batch. The step is read after any clipping the loop does, so on a clipped step it is the
post-clip norm, and the pre-clip norm is what ``clip_grad_norm_`` returns. Only rank 0 creates a
run in the store and writes to it.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from seismo.monitor import Monitor
from seismo.report import RunStore, load_run

WORLD = 2
STEPS = 4  # the last step clips
CLIP = 1e-3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def full_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = nn.parallel.DistributedDataParallel(make_model())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        mon = Monitor(model, opt, store=store, run_name="ddp", probes="minimal", flush_every=1)
        for step in range(STEPS):
            x, y = full_batch(step)
            half = slice(rank * 4, rank * 4 + 4)
            loss = F.cross_entropy(model(x[half]), y[half])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if step == STEPS - 1:
                pre = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
                mon.log({"grad/norm_preclip": pre}, step=mon.step_count)
            opt.step()
            mon.step(loss)
        mon.close()
        torch.save(
            {"run_id": mon.run_id, "source": mon.probes[1].source, "history": mon.history},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def single_process_grad_norms() -> list[float]:
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    norms = []
    for step in range(STEPS):
        x, y = full_batch(step)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norms.append(float(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()))
        if step == STEPS - 1:
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
    return norms


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_grad_norm_equals_full_batch_and_only_rank0_writes(tmp_path):
    store = str(tmp_path / "runs.sqlite")
    mp.spawn(_worker, args=(free_port(), store, str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    expected = single_process_grad_norms()
    for r, res in enumerate(results):
        assert res["source"] == "optimizer"  # under DDP the averaged gradients are read at the step
        steps, values = res["history"]["grad/norm"]
        assert steps == list(range(STEPS))
        assert values[:-1] == pytest.approx(expected[:-1], rel=1e-5), f"rank {r}"
        # the clipped step: grad/norm is post-clip under DDP; the logged pre-clip norm is the full-batch one
        assert values[-1] == pytest.approx(CLIP, rel=1e-4) and expected[-1] > 10 * CLIP
        assert res["history"]["grad/norm_preclip"] == ([STEPS - 1], pytest.approx([expected[-1]], rel=1e-5))

    assert results[0]["run_id"] is not None
    assert results[1]["run_id"] is None
    with RunStore(store) as s:
        runs = s.runs()
    assert [(r.run_id, r.name, r.status) for r in runs] == [(results[0]["run_id"], "ddp", "completed")]
    run = load_run(store, results[0]["run_id"])
    assert run.series("grad/norm")[1].tolist() == results[0]["history"]["grad/norm"][1]
