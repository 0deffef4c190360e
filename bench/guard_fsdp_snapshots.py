"""Cost of the Guard's checkpoints of an FSDP2 model (torch.distributed.checkpoint) on CPU, 2 gloo processes.

    python bench/guard_fsdp_snapshots.py [--d 256] [--layers 4] [--repeats 5]

A TinyGPT (d, layers, 4 heads, T=128, vocab 512) trained for 2 steps with AdamW (so the optimizer
has state), then, in each of 2 processes with one torch thread:

* ring: ``sharded.capture`` (``get_state_dict`` + a CPU copy of this rank's shards),
* restore: ``sharded.restore`` of that capture (``set_state_dict``),
* disk: ``ShardedSnapshotWriter.submit`` (``torch.distributed.checkpoint.save`` of the live
  sharded state into a temporary directory, each rank's own file, barrier, rename by rank 0),
  synchronous in the training loop,
* load: ``sharded.load_dir`` of that directory (``torch.distributed.checkpoint.load``),

and, for comparison, in rank 0 alone on the unsharded model: ``snapshots.capture`` and
``atomic_torch_save`` of it (what the unsharded Guard's background thread writes), and one
training step of the sharded model. Median over ``repeats`` of the wall time and of the process
CPU time (all threads; DCP writes from its own thread), per rank. Paths are in a temporary
directory on the local disk.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _machine import cpu_model, loadavg

from seismo._io import atomic_torch_save
from seismo.mitigate.guard import sharded, snapshots
from seismo.mitigate.guard.config import GuardConfig
from seismo.mitigate.guard.window import SpikeWindow
from seismo.proxy.model import GPTConfig, TinyGPT

WORLD = 2


def timed(fn, repeats: int) -> tuple[float, float]:
    walls, cpus = [], []
    for _ in range(repeats):
        dist.barrier()
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls) * 1e3, statistics.median(cpus) * 1e3


def worker(rank: int, out: str, d: int, layers: int, repeats: int) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rdzv", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=600))
    try:
        cfg = GPTConfig(vocab_size=512, block_size=128, n_layer=layers, n_head=4, n_embd=d)
        torch.manual_seed(0)
        model = TinyGPT(cfg)
        plain = copy.deepcopy(model)
        n_params = sum(p.numel() for p in model.parameters())
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(rank)
        tok = torch.randint(0, 512, (8, 129), generator=g)

        def train_step():
            _, loss = model(tok[:, :-1], tok[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(2):
            train_step()
            _, loss = plain(tok[:, :-1], tok[:, 1:])
            loss.backward()
            plain_opt.step()
            plain_opt.zero_grad(set_to_none=True)
        window = SpikeWindow(GuardConfig())
        results = {"step": timed(train_step, repeats)}
        ck = {}

        def ring():
            ck["c"] = sharded.capture(2, 0, model, opt, {}, window)

        results["ring"] = timed(ring, repeats)
        results["restore"] = timed(lambda: sharded.restore(ck["c"], model, opt, {}, window, restore_rng=True,
                                                            warn=lambda k, m: None), repeats)
        directory = os.path.join(out, "ckpt")
        os.makedirs(directory, exist_ok=True)
        writer = sharded.ShardedSnapshotWriter(
            Path(directory), 1, model, opt, rank, snapshots.list_snapshots)
        k = iter(range(1000))
        results["disk"] = timed(lambda: writer.submit(snapshots.snapshot_path(writer.dir, next(k), 0, sharded=True),
                                                      ck["c"]), repeats)
        assert writer.error is None, writer.error
        newest = sorted(snapshots.list_snapshots(writer.dir))[-1][2]
        results["load"] = timed(lambda: sharded.load_dir(newest, model, opt, rank), repeats)
        if rank == 0:
            payload = {}

            def plain_ring():
                payload["p"] = snapshots.capture(2, 0, plain, plain_opt, {}, window)

            results["unsharded ring (1 process)"] = _solo(plain_ring, repeats)
            path = os.path.join(out, "plain.pt")
            results["unsharded torch.save (1 process)"] = _solo(lambda: atomic_torch_save(payload["p"], path), repeats)
            size = os.path.getsize(path)
            dcp_size = sum(os.path.getsize(os.path.join(newest, f)) for f in os.listdir(newest))
            print(f"TinyGPT d={d}, {layers} layers: {n_params / 1e6:.2f} M parameters; AdamW state; "
                  f"unsharded snapshot file {size / 1e6:.1f} MB, DCP directory {dcp_size / 1e6:.1f} MB")
        dist.barrier()
        torch.save(results, os.path.join(out, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _solo(fn, repeats: int) -> tuple[float, float]:
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls) * 1e3, statistics.median(cpus) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"machine: {cpu_model()}; load average before: {loadavg()}")
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(worker, args=(out, args.d, args.layers, args.repeats), nprocs=WORLD, join=True)
        res = [torch.load(os.path.join(out, f"r{r}.pt"), weights_only=True) for r in range(WORLD)]
    print(f"load average after: {loadavg()}")
    print("| operation | rank 0 wall ms | rank 0 CPU ms | rank 1 wall ms | rank 1 CPU ms |")
    print("|---|---|---|---|---|")
    for name in res[0]:
        r1 = res[1].get(name)
        tail = f"{r1[0]:.1f} | {r1[1]:.1f}" if r1 else "- | -"
        print(f"| {name} | {res[0][name][0]:.1f} | {res[0][name][1]:.1f} | {tail} |")


if __name__ == "__main__":
    main()
