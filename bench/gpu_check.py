"""GPU readiness of the monitor: a 124M GPT-2, bf16 autocast, ``torch.compile``, on one CUDA device.

    python bench/gpu_check.py [--steps 60] [--warmup 15] [--batch 8] [--seq 1024] [--every 10]

Skipped (exit 0, one line) without CUDA. Two copies of seismo's TinyGPT at GPT-2 small's size
(12 layers, 12 heads, d=768, vocabulary 50304, T=1024; about 124M parameters) with the same
weights train on the same batches (AdamW, bf16 autocast, compiled):

* ``compiled``          - no monitor;
* ``compiled+monitor``  - ``Monitor(model, opt, probes="default", every=--every)``.

Checks and prints:

1. no host synchronisation on untracked steps: those steps run under
   ``torch.cuda.set_sync_debug_mode("error")`` (any ``.item()``, ``.cpu()``, ``bool(tensor)`` or
   blocking copy raises); the monitor's one transfer happens at ``Monitor.flush`` (here: at close);
2. the overhead ratio (median step time, ``torch.cuda.synchronize`` after each step) and the added
   ms per step;
3. peak memory (``torch.cuda.max_memory_allocated``) with and without the monitor;
4. graphs compiled after warm-up (must be 0: the monitor causes no recompilation).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
from torch._dynamo.utils import counters

from seismo.monitor import Monitor
from seismo.proxy.model import GPTConfig, TinyGPT


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--every", type=int, default=10)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: skipped (no CUDA device)")
        return None
    dev = torch.device("cuda")
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50304, block_size=args.seq, n_layer=12, n_head=12, n_embd=768)
    base = TinyGPT(cfg)
    n_params = sum(p.numel() for p in base.parameters())
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g) for _ in range(args.warmup + args.steps)]

    results = {}
    for name in ("compiled", "compiled+monitor"):
        model = copy.deepcopy(base).to(dev)
        run = torch.compile(model)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
        mon = Monitor(run, opt, probes="default", every=args.every, flush_every=10**6) if name != "compiled" else None  # flushed at close
        torch.cuda.reset_peak_memory_stats(dev)
        times, graphs_before = [], None
        for i, batch in enumerate(data):
            if i == args.warmup:
                graphs_before = counters["stats"]["unique_graphs"]
            batch = batch.to(dev, non_blocking=True)
            torch.cuda.synchronize(dev)
            untracked = mon is not None and i % args.every != 0
            t0 = time.perf_counter()
            if untracked:
                torch.cuda.set_sync_debug_mode("error")
            try:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    _, loss = run(batch[:, :-1], batch[:, 1:])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if mon is not None:
                    mon.step(loss)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize(dev)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        if mon is not None:
            mon.close()
        results[name] = dict(
            ms=statistics.median(times) * 1e3,
            peak_gib=torch.cuda.max_memory_allocated(dev) / 2**30,
            graphs_after_warmup=counters["stats"]["unique_graphs"] - graphs_before,
        )
        del model, run, opt
        torch.cuda.empty_cache()

    a, b = results["compiled"], results["compiled+monitor"]
    out = {
        "device": torch.cuda.get_device_name(dev), "params": n_params, "batch": args.batch, "seq": args.seq,
        "compiled_ms": round(a["ms"], 2), "monitored_ms": round(b["ms"], 2), "ratio": round(b["ms"] / a["ms"], 3),
        "added_ms": round(b["ms"] - a["ms"], 2), "peak_gib": round(a["peak_gib"], 3), "peak_gib_monitored": round(b["peak_gib"], 3),
        "graphs_after_warmup_monitored": b["graphs_after_warmup"], "no_sync_on_untracked_steps": True,
    }
    print(f"{out['device']}: GPT-2 {n_params / 1e6:.0f}M, bf16, compiled, B={args.batch} T={args.seq}")
    print(f"  step {out['compiled_ms']:.1f} ms -> {out['monitored_ms']:.1f} ms with the monitor (ratio {out['ratio']:.3f})")
    print(f"  peak memory {out['peak_gib']:.2f} GiB -> {out['peak_gib_monitored']:.2f} GiB")
    print(f"  graphs compiled after warm-up with the monitor: {out['graphs_after_warmup_monitored']}; no host sync on untracked steps")
    return out


if __name__ == "__main__":
    sys.exit(0 if main() is not None or not torch.cuda.is_available() else 1)
