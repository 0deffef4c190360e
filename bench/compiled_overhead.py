"""Overhead of seismo's default preset on a ``torch.compile``d model (CPU).

    python bench/compiled_overhead.py [--rounds 8] [--block 10] [--warmup 12] [--threads 1]
                                      [--batch 16] [--seq 64] [--backend inductor]

Two copies of seismo's TinyGPT (d=128, 2 layers, 4 heads, vocabulary 256) with the same weights,
each wrapped in ``torch.compile``, train on the same batches in the same process (forward, loss,
``zero_grad``, backward, AdamW step):

* ``compiled``         - no monitor: the baseline;
* ``compiled-2``       - a second unmonitored copy: the A/A control (how far two identical loops
  drift apart on this machine during the run: the noise floor);
* ``compiled+default`` - ``Monitor(model, opt, probes="default")``: loss, gradient, attention,
  output-logit and activation signals every step, update norms and Adam state every 10 steps.

All warm up for ``--warmup`` steps (compilation, and the monitor's tracked/untracked graph
variants), then train in blocks of ``--block`` steps, rotating which copy goes first, so load
from other processes hits all alike. Printed: the median step time of each by wall clock and by
CPU time of the training thread (``time.thread_time``; with one torch thread all of torch's work
runs on it, so time slices taken by other processes do not count), the ratios to ``compiled``
(goal <= 1.05), the added time per tracked step in ms (every step is tracked by the default
preset), and how many graphs dynamo compiled during the timed steps (must be 0: the monitor
causes no recompilation). ``--split`` adds one copy per probe of the default preset, tracked every
step (the update and Adam probes, every 10 steps in the preset, are left out), to see where the
added time goes.
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

from seismo.monitor import Monitor, build_probes  # noqa: E402
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
    ap.add_argument("--split", action="store_true", help="also one copy per probe of the default preset (every step)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=256, block_size=args.seq, n_layer=2, n_head=4, n_embd=128)
    base = TinyGPT(cfg)
    g = torch.Generator().manual_seed(1)
    n = args.warmup + args.rounds * args.block
    data = [torch.randint(0, 256, (args.batch, args.seq + 1), generator=g) for _ in range(n)]

    copies: dict = {"compiled": None, "compiled-2": None, "compiled+default": "default"}
    if args.split:
        copies.update({f"+{p.name}": [p] for p in build_probes("default", every_n=1) if p.name not in ("update", "adam")})
    loops = {}
    for name, probes in copies.items():
        model = copy.deepcopy(base)
        run = torch.compile(model, backend=args.backend)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        mon = Monitor(run, opt, probes=probes, flush_every=50) if probes is not None else None
        loops[name] = dict(run=run, opt=opt, mon=mon, step=0, times=[], cpu=[])

    def step(loop: dict, record: bool) -> None:
        batch = data[loop["step"]]
        t0, c0 = time.perf_counter(), time.thread_time()
        _, loss = loop["run"](batch[:, :-1], batch[:, 1:])
        loop["opt"].zero_grad(set_to_none=True)
        loss.backward()
        loop["opt"].step()
        if loop["mon"] is not None:
            loop["mon"].step(loss)
        dt, dc = time.perf_counter() - t0, time.thread_time() - c0
        loop["step"] += 1
        if record:
            loop["times"].append(dt)
            loop["cpu"].append(dc)

    for loop in loops.values():
        for _ in range(args.warmup):
            step(loop, record=False)
    graphs_before = counters["stats"]["unique_graphs"]
    names = list(loops)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            for _ in range(args.block):
                step(loops[name], record=True)
    graphs_during = counters["stats"]["unique_graphs"] - graphs_before
    for loop in loops.values():
        if loop["mon"] is not None:
            loop["mon"].close()

    med = {name: statistics.median(loop["times"]) * 1e3 for name, loop in loops.items()}
    cpu = {name: statistics.median(loop["cpu"]) * 1e3 for name, loop in loops.items()}
    out = {
        "cpu": cpu_model(), "load": loadavg(), "threads": args.threads, "backend": args.backend,
        "batch": args.batch, "seq": args.seq, "steps_timed": args.rounds * args.block,
        "compiled_ms": round(med["compiled"], 2), "monitored_ms": round(med["compiled+default"], 2),
        "ratio": round(med["compiled+default"] / med["compiled"], 3),
        "ratio_aa": round(med["compiled-2"] / med["compiled"], 3),
        "ratio_cpu": round(cpu["compiled+default"] / cpu["compiled"], 3),
        "ratio_cpu_aa": round(cpu["compiled-2"] / cpu["compiled"], 3),
        "added_ms_per_tracked_step": round(med["compiled+default"] - med["compiled"], 2),
        "added_cpu_ms_per_tracked_step": round(cpu["compiled+default"] - cpu["compiled"], 2),
        "graphs_compiled_while_timed": graphs_during,
    }
    print(f"CPU: {out['cpu']}  load: {out['load']}  threads: {args.threads}  backend: {args.backend}")
    print(f"TinyGPT d=128 L=2 B={args.batch} T={args.seq}, {out['steps_timed']} timed steps per copy")
    for name in loops:
        print(f"  {name:17s} median {med[name]:8.2f} ms/step wall, {cpu[name]:8.2f} ms CPU"
              f"  ratio {med[name] / med['compiled']:.3f} wall, {cpu[name] / cpu['compiled']:.3f} CPU")
    print(f"  default preset: ratio {out['ratio']:.3f} wall / {out['ratio_cpu']:.3f} CPU (goal <= 1.05; A/A "
          f"{out['ratio_aa']:.3f} / {out['ratio_cpu_aa']:.3f}); added {out['added_ms_per_tracked_step']:.2f} ms wall, "
          f"{out['added_cpu_ms_per_tracked_step']:.2f} ms CPU per tracked step")
    print(f"  graphs compiled during the timed steps: {graphs_during} (0 = no recompilation)")
    return out


if __name__ == "__main__":
    main()
