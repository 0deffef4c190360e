"""The Guard under FSDP2 (``fully_shard``): 2 CPU processes with gloo, TinyGPT.

A loss spike is shown to rank 1's Guard only; the flags are all-reduced with MAX, so both ranks
must skip that step (their parameter shards and AdamW state unchanged) and report the same events.
The Guard's gradient norm is the norm of the full (sharded) gradient, the same on both ranks.
Rollback of a sharded model is refused at construction with a one-line ConfigError: the Guard's
snapshots are plain ``state_dict`` copies, not ``torch.distributed.checkpoint`` shards.
"""

from __future__ import annotations

import datetime
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from seismo.errors import ConfigError
from seismo.mitigate.guard import Guard, GuardWarning
from seismo.proxy.model import GPTConfig, TinyGPT

WORLD = 2
STEPS = 16
SPIKE = 12
CFG = GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16)


def batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, CFG.vocab_size, (4, CFG.block_size + 1), generator=g)


def _local_state(model, opt):
    params = [p.detach().to_local().clone() for p in model.parameters()]
    state = [v.to_local().clone() for s in opt.state.values() for v in s.values() if v.dim() > 0]
    return params + state


def _worker(rank: int, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    warnings.simplefilter("ignore", GuardWarning)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'rdzv')}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        torch.manual_seed(0)
        model = TinyGPT(CFG)
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        try:
            Guard(model, opt, policy="rollback")
            refused = ""
        except ConfigError as exc:
            refused = str(exc)
        guard = Guard(model, opt, policy="skip", warmup=8)
        unchanged, skipped_at = None, []
        half = slice(rank * 2, rank * 2 + 2)
        for i in guard.steps(STEPS):
            tok = batch(i)[half]
            _, loss = model(tok[:, :-1], tok[:, 1:])
            loss.backward()
            seen = loss * 1000.0 if (rank == 1 and i == SPIKE) else loss
            before = _local_state(model, opt) if i == SPIKE else None
            if guard.step(seen):
                skipped_at.append(i)
            if before is not None:
                unchanged = all(torch.equal(a, b) for a, b in zip(before, _local_state(model, opt)))
        guard.flush()
        torch.save({"refused": refused, "skipped_at": skipped_at, "unchanged": unchanged,
                    "events": [(e.kind, e.step) for e in guard.events], "stats": guard.stats},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_fsdp2_ranks_decide_together_and_rollback_is_refused(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    for r in (r0, r1):
        assert "rollback" in r["refused"] and "policy='skip'" in r["refused"]
        assert r["skipped_at"] == [SPIKE]  # rank 0 saw no spike, yet skipped with rank 1
        assert r["unchanged"]  # its shards and AdamW state did not move
    assert r0["events"] == r1["events"] == [("guard_skip", SPIKE)]
    assert r0["stats"] == r1["stats"]
