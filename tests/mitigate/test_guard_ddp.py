"""The Guard under DistributedDataParallel: 2 CPU processes with gloo.

A spike is shown to rank 1's Guard only (its loss is multiplied by 1000 for the decision; the
gradients DDP averages are normal), so only rank 1 flags the step. The flags are all-reduced
with MAX before they are applied: both ranks must skip the step (parameters and AdamW state
unchanged) and stay bitwise identical. Checked for every skip mode.
"""

from __future__ import annotations

import copy
import datetime
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from seismo.errors import ConfigError
from seismo.mitigate.guard import Guard, GuardWarning

WORLD = 2
STEPS = 30
SPIKE = 20
MODES = ("sync", "mask", "fused")


def full_batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 6, generator=g)
    return x, x.sum(1, keepdim=True).tanh()


def _state(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()["state"])


def _same(a, b) -> bool:
    (pa, sa), (pb, sb) = a, b
    return all(torch.equal(x, y) for x, y in zip(pa, pb)) and all(
        torch.equal(sa[k][n], sb[k][n]) for k in sa for n in sa[k])


def _worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", GuardWarning)
    # a file store private to this test, not a TCP port: a port picked by one test can be taken by
    # another test starting at the same moment (other DDP tests run concurrently on a shared machine)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=300))
    try:
        results = {}
        for mode in MODES:
            torch.manual_seed(0)
            model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1)))
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=mode == "fused")
            guard = Guard(model, opt, policy="skip", skip_mode=mode, warmup=10)
            unchanged = None
            for i in guard.steps(STEPS):
                x, y = full_batch(i)
                half = slice(rank * 4, rank * 4 + 4)
                loss = F.mse_loss(model(x[half]), y[half])
                loss.backward()
                seen = loss * 1000.0 if (rank == 1 and i == SPIKE) else loss
                before = _state(model, opt) if i == SPIKE else None
                guard.step(seen)
                if before is not None:
                    unchanged = _same(before, _state(model, opt))
            guard.flush()
            results[mode] = {
                "params": [p.detach().clone() for p in model.parameters()],
                "skipped": guard.stats["skipped_steps"],
                "events": [(e.kind, e.step) for e in guard.events],
                "unchanged": unchanged,
                "mode": guard.skip_mode,
            }
        # rank 0 cannot create ckpt_dir (a path under a file): every rank gets the ConfigError, none waits
        blocker = os.path.join(out_dir, "a_file")
        if rank == 0:
            open(blocker, "w").close()
        dist.barrier()
        model = nn.parallel.DistributedDataParallel(nn.Linear(2, 1))
        try:
            Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), ckpt_dir=os.path.join(blocker, "ckpt"))
            results["bad_ckpt_dir"] = None
        except ConfigError as e:
            results["bad_ckpt_dir"] = str(e)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_all_ranks_skip_together_and_stay_identical(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD))
    assert r0["bad_ckpt_dir"] and "ckpt" in r0["bad_ckpt_dir"] and r1["bad_ckpt_dir"] == r0["bad_ckpt_dir"] + " (on rank 0)"
    for mode in MODES:
        a, b = r0[mode], r1[mode]
        assert a["mode"] == b["mode"] == mode
        assert a["skipped"] == b["skipped"] == 1, mode  # rank 0 saw no spike, yet skipped with rank 1
        assert a["unchanged"] and b["unchanged"], mode  # no update, no AdamW state advance
        assert a["events"] == b["events"] == [("guard_skip", SPIKE)]
        assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"])), mode
