"""The Guard under FSDP2 (``fully_shard``): 2 CPU processes with gloo, TinyGPT.

A loss spike is shown to rank 1's Guard only; the flags are all-reduced with MAX, so both ranks
must skip that step (their parameter shards and AdamW state unchanged) and report the same events,
in each skip mode: ``sync``, ``mask`` (snapshot and ``where`` on each rank's local shards: DTensor
has no sharding rule for ``_foreach_copy_``) and ``fused`` (AdamW(fused=True) with ``found_inf``).
The Guard's gradient norm is the norm of the full (sharded) gradient, the same on both ranks.

Rollback through ``torch.distributed.checkpoint``: a loss spike on three consecutive data indices,
shown to rank 1 only, makes both ranks skip three steps and roll back to the in-memory checkpoint
of step 12. Right after the rollback every rank's parameter shards and AdamW state (moments and
step counter) must equal, bitwise, what they were when step 12 was first reached. The run then
goes on past the skipped data; its losses must equal, bitwise, those of the same FSDP2 model
trained without a Guard on the data schedule that never saw the skipped batches (from step 0),
and, within 1e-6 relative (measured: 1.1e-7), the losses of an unsharded single-process run of that schedule on the
full batch. Disk: a second FSDP2 model and Guard resume from the newest DCP snapshot directory
(written by both ranks, renamed by rank 0) and must repeat the first run's last losses bitwise.

Back to step 0, where AdamW has no state yet (checkpointed as its bare param groups, since
``get_state_dict`` would initialise the state with a zero-LR step): a spike at data 7-9 with
checkpoints every 8 steps rolls back to step 0; the run must equal the never-saw run bitwise, and a
new model resuming on that directory, after rank 1's own file of the newer (step 8) snapshot was
truncated, must fall back to the step-0 snapshot on both ranks (one warning naming rank 1) and
repeat the whole run bitwise.

A disk that fails on one rank: DCP's storage write raises ENOSPC on rank 1 from the second snapshot
on (inside ``torch.distributed.checkpoint.save``, which re-raises it on every rank as a
``CheckpointException``, a ``BaseException``). Both ranks must go on in memory only, with one
warning on rank 0 and no hang; the step-0 snapshot stays the only directory, no temporary directory
is left, and the rollback from the ring gives bitwise the losses of the run whose disk worked.

Tensor parallel (``parallelize_module`` with ``ColwiseParallel`` / ``RowwiseParallel`` on a 2-layer
MLP, parameters sharded on dim 0, dim 1, or replicated): the same spike and rollback; both ranks
decide alike, and the losses equal an unsharded run that never saw the skipped batches (rel 1e-6).
"""

from __future__ import annotations

import copy
import datetime
import math
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from seismo.mitigate.guard import Guard, GuardWarning, data_index
from seismo.proxy.model import GPTConfig, TinyGPT

WORLD = 2
MODES = ("sync", "mask", "fused")  # how a step is skipped (docs/GUARD.md); auto is sync on CPU, mask on a GPU
STEPS = 16
SPIKE = 12
CFG = GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16)


def batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, CFG.vocab_size, (4, CFG.block_size + 1), generator=g)


def _worker(rank: int, out_dir: str) -> None:
    """Both scenarios in one pair of processes (starting them costs more than the training)."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", GuardWarning)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'rdzv')}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        torch.save(_skip_scenario(rank), os.path.join(out_dir, f"skip{rank}.pt"))
        torch.save(_rollback_scenario(rank, out_dir), os.path.join(out_dir, f"rollback{rank}.pt"))
        torch.save(_step0_scenario(rank, out_dir), os.path.join(out_dir, f"step0{rank}.pt"))
        torch.save(_disk_failure_scenario(rank, out_dir), os.path.join(out_dir, f"diskfail{rank}.pt"))
        torch.save(_tensor_parallel_scenario(rank), os.path.join(out_dir, f"tp{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("fsdp_guard")
    mp.spawn(_worker, args=(str(out),), nprocs=WORLD, join=True)
    return {kind: [torch.load(out / f"{kind}{r}.pt", weights_only=False) for r in range(WORLD)]
            for kind in ("skip", "rollback", "step0", "diskfail", "tp")}


def _skip_scenario(rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    out = {}
    for mode in MODES:
        torch.manual_seed(0)
        model = TinyGPT(CFG)
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=mode == "fused")
        guard = Guard(model, opt, policy="skip", warmup=8, skip_mode=mode)
        unchanged, skipped_at, losses = None, [], []
        half = slice(rank * 2, rank * 2 + 2)
        for i in guard.steps(STEPS):
            tok = batch(i)[half]
            _, loss = model(tok[:, :-1], tok[:, 1:])
            loss.backward()
            seen = loss * 1000.0 if (rank == 1 and i == SPIKE) else loss
            before = _full_state(model, opt) if i == SPIKE else None
            if guard.step(seen):
                skipped_at.append(i)
            if before is not None:
                unchanged = all(torch.equal(a, b) for a, b in zip(before, _full_state(model, opt)))
            losses.append(loss.item())
        guard.flush()
        out[mode] = {"skipped_at": skipped_at, "unchanged": unchanged, "mode": guard.skip_mode, "losses": losses,
                     "events": [(e.kind, e.step) for e in guard.events], "stats": guard.stats}
    return out


@pytest.mark.parametrize("mode", MODES)
def test_fsdp2_ranks_decide_together(results, mode):
    r0, r1 = (r[mode] for r in results["skip"])
    for r in (r0, r1):
        assert r["mode"] == mode
        assert r["skipped_at"] == [SPIKE]  # rank 0 saw no spike, yet skipped with rank 1
        assert r["unchanged"]  # its shards, AdamW moments and step counters did not move
    assert r0["events"] == r1["events"] == [("guard_skip", SPIKE)]
    assert r0["stats"] == r1["stats"]
    if mode == "mask":  # the optimizer of the sync run: every masked step is bitwise an applied or a skipped one
        for rank, r in enumerate((r0, r1)):
            assert r["losses"] == results["skip"][rank]["sync"]["losses"]


# --- rollback through torch.distributed.checkpoint -----------------------------------------------
RB_STEPS = 28
RB_SPIKE = (14, 15, 16)  # data indices whose loss rank 1's Guard sees x1000
RB_CFG = dict(policy="rollback", warmup=6, window=16, interval=4, ring_size=4, rewind=2, skip_ahead=2,
              max_consecutive_skips=3, disk_interval=8, disk_keep=2, sync_every=1)


def _full_state(model, opt):
    """This rank's shards and optimizer state, including AdamW's step counters (plain tensors)."""
    params = [p.detach().to_local().clone() for p in model.parameters()]
    state = [(v.to_local() if hasattr(v, "to_local") else v).clone() for s in opt.state.values() for v in s.values()]
    return params + state


def _sharded_model():
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = TinyGPT(CFG)
    unsharded = copy.deepcopy(model)
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    return model, unsharded


def _guarded_run(model, opt, guard, half, rank, *, stop=RB_STEPS, spike=RB_SPIKE):
    losses, at12, after_rollback = {}, None, None
    for i in guard.steps(stop):
        t = guard.step_count
        if t == 12:
            if at12 is None:
                at12 = _full_state(model, opt)
            elif after_rollback is None:
                after_rollback = all(torch.equal(a, b) for a, b in zip(at12, _full_state(model, opt)))
        tok = batch(i)[half]
        _, loss = model(tok[:, :-1], tok[:, 1:])
        loss.backward()
        seen = loss * 1000.0 if (rank == 1 and i in spike) else loss
        guard.step(seen)
        losses[t] = (i, loss.item())  # a rolled-back step is overwritten by its replay
    return losses, after_rollback


def _plain_run(model, tokens_of, ranges, steps=RB_STEPS):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = {}
    for t in range(steps):
        i = data_index(t, ranges)
        tok = tokens_of(i)
        _, loss = model(tok[:, :-1], tok[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out[t] = (i, loss.item())
    return out


def _rollback_scenario(rank: int, out_dir: str) -> dict:
    half = slice(rank * 2, rank * 2 + 2)
    ckpt = os.path.join(out_dir, "guard")
    model, unsharded = _sharded_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = Guard(model, opt, ckpt_dir=ckpt, **RB_CFG)
    losses, after_rollback = _guarded_run(model, opt, guard, half, rank)
    guard.close()
    ranges = guard.skipped_ranges
    files = sorted(os.listdir(ckpt))

    # the same FSDP2 model, no Guard, on the schedule that never saw the skipped batches
    fresh, _ = _sharded_model()
    never_saw = _plain_run(fresh, lambda i: batch(i)[half], ranges)
    # unsharded, one process, full batch (each rank computes it; rank 0's is used)
    reference = _plain_run(unsharded, batch, ranges)

    # disk: a new model and Guard resume from the newest snapshot directory and finish the run
    again, _ = _sharded_model()
    opt2 = torch.optim.AdamW(again.parameters(), lr=1e-2)
    guard2 = Guard(again, opt2, ckpt_dir=ckpt, **RB_CFG)
    resumed_at = guard2.resume()
    resumed, _ = _guarded_run(again, opt2, guard2, half, rank)
    guard2.close()
    return {"losses": losses, "after_rollback": after_rollback, "ranges": ranges, "files": files,
            "events": [(e.kind, e.step) for e in guard.events], "rollbacks": guard.rollbacks,
            "never_saw": never_saw, "reference": reference, "resumed_at": resumed_at, "resumed": resumed,
            "resumed_ranges": guard2.skipped_ranges}


def test_fsdp2_rollback_restores_the_sharded_state(results):
    r0, r1 = results["rollback"]
    # both ranks: three skips (rank 0 saw no spike), one rollback to step 12, data [12, 19) skipped
    for r in (r0, r1):
        assert [k for k, _ in r["events"]] == ["guard_skip"] * 3 + ["guard_rollback"], r["events"]
        assert r["rollbacks"][0]["restored_step"] == 12 and r["ranges"] == [(12, 19)]
        assert r["after_rollback"] is True  # shards, moments and step counters as at step 12, bitwise
        assert r["losses"] == r["never_saw"]  # bitwise the run that never saw the skipped batches
        assert r["resumed_at"] == 24 and r["resumed_ranges"] == r["ranges"]
        assert r["resumed"] == {t: v for t, v in r["losses"].items() if t >= 24}  # bitwise from the DCP snapshot
    decided = [{k: v for k, v in rb.items() if k not in ("evidence", "time")} for rb in r0["rollbacks"]]
    assert r0["events"] == r1["events"] and decided == [{k: v for k, v in rb.items() if k not in ("evidence", "time")}
                                                       for rb in r1["rollbacks"]]  # evidence: each rank's own loss
    assert r0["files"] == ["guard-step000000016-e1.dcp", "guard-step000000024-e1.dcp", "guard_tracker.json"]
    ref = r0["reference"]
    for t in range(RB_STEPS):  # the mean of the two half-batch losses is the full-batch loss
        (i0, a), (i1, b), (ir, c) = r0["losses"][t], r1["losses"][t], ref[t]
        assert i0 == i1 == ir
        assert math.isclose((a + b) / 2, c, rel_tol=1e-6), (t, (a + b) / 2, c)


def _step0_scenario(rank: int, out_dir: str) -> dict:
    half = slice(rank * 2, rank * 2 + 2)
    ckpt = os.path.join(out_dir, "guard0")
    cfg = dict(RB_CFG, interval=8, disk_interval=8, warmup=4)
    model, _ = _sharded_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = Guard(model, opt, ckpt_dir=ckpt, **cfg)
    losses, _ = _guarded_run(model, opt, guard, half, rank, stop=12, spike=(7, 8, 9))
    guard.close()
    fresh, _ = _sharded_model()
    never_saw = _plain_run(fresh, lambda i: batch(i)[half], guard.skipped_ranges, steps=12)
    files = sorted(os.listdir(ckpt))
    dist.barrier()
    if rank == 1:  # damage rank 1's own file of the newest snapshot: every rank must fall back to step 0
        with open(os.path.join(ckpt, "guard-step000000008-e1.dcp", "rank1.pt"), "r+b") as f:
            f.truncate(100)
    dist.barrier()
    again, _ = _sharded_model()
    opt2 = torch.optim.AdamW(again.parameters(), lr=1e-2)
    guard2 = Guard(again, opt2, ckpt_dir=ckpt, **cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed_at = guard2.resume()
    resumed, _ = _guarded_run(again, opt2, guard2, half, rank, stop=12, spike=(7, 8, 9))
    guard2.close()
    return {"events": [(e.kind, e.step) for e in guard.events], "restored": [r["restored_step"] for r in guard.rollbacks],
            "losses": losses, "never_saw": never_saw, "files": files, "resumed_at": resumed_at, "resumed": resumed,
            "resume_warnings": [str(w.message) for w in caught if issubclass(w.category, GuardWarning)]}


def test_fsdp2_rollback_to_a_step_without_optimizer_state(results):
    r0, r1 = results["step0"]
    assert r0["files"] == ["guard-step000000000-e0.dcp", "guard-step000000008-e1.dcp", "guard_tracker.json"]
    for r in (r0, r1):
        assert r["events"] == r0["events"] and [k for k, _ in r["events"]] == ["guard_skip"] * 3 + ["guard_rollback"]
        assert r["restored"] == [0]
        assert r["losses"] == r["never_saw"]  # bitwise: AdamW restarted with no state, as at step 0
        assert r["resumed_at"] == 0 and r["resumed"] == r["losses"]  # from the step-0 DCP snapshot, bitwise
    assert r1["resume_warnings"] == [] and len(r0["resume_warnings"]) == 1
    assert "guard-step000000008-e1.dcp" in r0["resume_warnings"][0] and "rank 1:" in r0["resume_warnings"][0]


def _disk_failure_scenario(rank: int, out_dir: str) -> dict:
    import torch.distributed.checkpoint.filesystem as fs

    writes = []
    original = fs.FileSystemWriter.write_data

    def write_data(self, plan, planner):
        writes.append(1)
        if rank == 1 and len(writes) >= 2:
            raise OSError(28, "No space left on device")
        return original(self, plan, planner)

    ckpt = os.path.join(out_dir, "guard_full_disk")
    half = slice(rank * 2, rank * 2 + 2)
    model, _ = _sharded_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    fs.FileSystemWriter.write_data = write_data
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            guard = Guard(model, opt, ckpt_dir=ckpt, **RB_CFG)
            losses, after_rollback = _guarded_run(model, opt, guard, half, rank)
            guard.close()
    finally:
        fs.FileSystemWriter.write_data = original
    return {"losses": losses, "after_rollback": after_rollback, "in_memory_only": guard.in_memory_only,
            "warnings": [str(w.message) for w in caught if issubclass(w.category, GuardWarning)],
            "files": sorted(os.listdir(ckpt)), "events": [(e.kind, e.step) for e in guard.events]}


def test_fsdp2_disk_failure_on_one_rank(results):
    r0, r1 = results["diskfail"]
    normal = results["rollback"]
    for r, ok in zip((r0, r1), normal):
        assert r["in_memory_only"] and r["after_rollback"] is True
        assert r["files"] == ["guard-step000000000-e0.dcp"]  # no temporary directory, no later snapshot or tracker
        assert r["events"] == ok["events"] and r["losses"] == ok["losses"]  # the ring alone gives the same run
    assert r1["warnings"] == []
    assert len(r0["warnings"]) == 1 and "guard-step000000008-e0.dcp" in r0["warnings"][0]
    assert "rank 1: OSError: [Errno 28] No space left on device" in r0["warnings"][0], r0["warnings"]


# --- tensor parallel ------------------------------------------------------------------------------
class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _regression(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)


def _tensor_parallel_scenario(rank: int) -> dict:
    from torch.distributed.tensor import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    model = _MLP()
    unsharded = copy.deepcopy(model)
    parallelize_module(model, init_device_mesh("cpu", (WORLD,)), {"up": ColwiseParallel(), "down": RowwiseParallel()})
    placements = sorted({str(p.placements) for p in model.parameters()})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = Guard(model, opt, **RB_CFG)
    losses = {}
    for i in guard.steps(24):
        x, y = _regression(i)  # every rank sees the whole batch (tensor parallel)
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        t = guard.step_count
        guard.step(loss * 1000.0 if (rank == 1 and i in RB_SPIKE) else loss)
        losses[t] = (i, loss.item())
    guard.close()
    opt = torch.optim.AdamW(unsharded.parameters(), lr=1e-2)
    reference = {}
    for t in range(24):
        i = data_index(t, guard.skipped_ranges)
        x, y = _regression(i)
        loss = (unsharded(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        reference[t] = (i, loss.item())
    return {"placements": placements, "events": [(e.kind, e.step) for e in guard.events],
            "ranges": guard.skipped_ranges, "losses": losses, "reference": reference}


def test_tensor_parallel_rollback(results):
    r0, r1 = results["tp"]
    assert r0["placements"] == ["(Replicate(),)", "(Shard(dim=0),)", "(Shard(dim=1),)"]
    assert r0["events"] == r1["events"] and [k for k, _ in r0["events"]] == ["guard_skip"] * 3 + ["guard_rollback"]
    assert r0["ranges"] == r1["ranges"] == [(12, 19)]
    for r in (r0, r1):
        for t, (i, loss) in r["reference"].items():
            assert r["losses"][t][0] == i and math.isclose(r["losses"][t][1], loss, rel_tol=1e-6), (t, r["losses"][t], loss)
