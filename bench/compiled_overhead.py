"""Overhead of seismo's default preset on a ``torch.compile``d model (CPU).

    python bench/compiled_overhead.py [--rounds 8] [--block 10] [--warmup 12] [--threads 1]
                                      [--batch 16] [--seq 64] [--backend inductor]

Two copies of seismo's TinyGPT (d=128, 2 layers, 4 heads, vocabulary 256) with the same weights,
each wrapped in ``torch.compile``, train on the same batches in the same process (forward, loss,
``zero_grad``, backward, AdamW step):

* ``compiled``         - no monitor: the baseline;
* ``compiled+default`` - ``Monitor(model, opt, probes="default")``: loss, gradient, attention,
  output-logit and activation signals every step, update norms and Adam state every 10 steps.

Both warm up for ``--warmup`` steps (compilation, and the monitor's tracked/untracked graph
variants), then train in blocks of ``--block`` steps, alternating which copy goes first, so load
from other processes hits both alike. Printed: the median step time of each (wall clock), their
ratio (goal <= 1.05), the added time per tracked step in ms (every step is tracked by the default
preset), and how many graphs dynamo compiled during the timed steps (must be 0: the monitor causes
no recompilation).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model, loadavg  # noqa: E402

from seismo.monitor import Monitor  # noqa: E402
from seismo.proxy.model import GPTConfig, TinyGPT  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--backend", default="inductor")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=256, block_size=args.seq, n_layer=2, n_head=4, n_embd=128)
    base = TinyGPT(cfg)
    g = torch.Generator().manual_seed(1)
    n = args.warmup + args.rounds * args.block
    data = [torch.randint(0, 256, (args.batch, args.seq + 1), generator=g) for _ in range(n)]

    loops = {}
    for name in ("compiled", "compiled+default"):
        model = copy.deepcopy(base)
        run = torch.compile(model, backend=args.backend)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        mon = Monitor(run, opt, probes="default", flush_every=50) if name != "compiled" else None
        loops[name] = dict(run=run, opt=opt, mon=mon, step=0, times=[])

    def step(loop: dict, record: bool) -> None:
        batch = data[loop["step"]]
        t0 = time.perf_counter()
        _, loss = loop["run"](batch[:, :-1], batch[:, 1:])
        loop["opt"].zero_grad(set_to_none=True)
        loss.backward()
        loop["opt"].step()
        if loop["mon"] is not None:
            loop["mon"].step(loss)
        dt = time.perf_counter() - t0
        loop["step"] += 1
        if record:
            loop["times"].append(dt)

    for loop in loops.values():
        for _ in range(args.warmup):
            step(loop, record=False)
    graphs_before = counters["stats"]["unique_graphs"]
    names = list(loops)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            for _ in range(args.block):
                step(loops[name], record=True)
    graphs_during = counters["stats"]["unique_graphs"] - graphs_before
    for loop in loops.values():
        if loop["mon"] is not None:
            loop["mon"].close()

    med = {name: statistics.median(loop["times"]) * 1e3 for name, loop in loops.items()}
    out = {
        "cpu": cpu_model(), "load": loadavg(), "threads": args.threads, "backend": args.backend,
        "batch": args.batch, "seq": args.seq, "steps_timed": args.rounds * args.block,
        "compiled_ms": round(med["compiled"], 2), "monitored_ms": round(med["compiled+default"], 2),
        "ratio": round(med["compiled+default"] / med["compiled"], 3),
        "added_ms_per_tracked_step": round(med["compiled+default"] - med["compiled"], 2),
        "graphs_compiled_while_timed": graphs_during,
    }
    print(f"CPU: {out['cpu']}  load: {out['load']}  threads: {args.threads}  backend: {args.backend}")
    print(f"TinyGPT d=128 L=2 B={args.batch} T={args.seq}, {out['steps_timed']} timed steps per copy")
    print(f"  compiled          median {out['compiled_ms']:8.2f} ms/step")
    print(f"  compiled+default  median {out['monitored_ms']:8.2f} ms/step")
    print(f"  ratio {out['ratio']:.3f} (goal <= 1.05); added {out['added_ms_per_tracked_step']:.2f} ms per tracked step")
    print(f"  graphs compiled during the timed steps: {graphs_during} (0 = no recompilation)")
    return out


if __name__ == "__main__":
    main()
