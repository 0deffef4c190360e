"""Overhead of seismo's Guard (rollback policy, default intervals) on TinyGPT training, on CPU.

    python bench/guard_overhead.py [--steps 100] [--rounds 4] [--warmup 10] [--skip-mode auto]

Two copies of the demo model (d=128, 2 layers, 4 heads, T=128, B=32, vocab 256) with the same
initialisation train on the same batches in the same process: one with the plain loop
(forward, backward, AdamW step, zero_grad), one through ``Guard(model, optimizer,
policy="rollback", ckpt_dir=<tmp>)`` with its defaults: per-step spike decision (grad norm,
robust z-score window), an in-memory checkpoint every 50 steps (ring of 4) and an on-disk
snapshot every 200 steps written by a background thread. Rounds alternate between the two so a
burst of load from other processes hurts both alike; each loop keeps running across rounds, so
the timed steps include checkpoints at exactly the default rate. Two ratios are printed:

* wall clock: total guarded time / total unguarded time over the same number of steps. On a
  shared machine this moves by several percent from round to round.
* direct: the time spent inside the Guard (``guard.step`` minus the ``optimizer.step`` it
  calls, plus ``next()`` on ``guard.steps``, where checkpoints are taken), added to the unguarded
  step time. Timing only the Guard's own code makes this robust to load from other processes.

Goal: <= 1.03.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import torch
from _machine import cpu_model, loadavg

from seismo._io import atomic_torch_save as _atomic_save
from seismo.mitigate.guard import Guard
from seismo.mitigate.guard.snapshots import capture
from seismo.proxy.model import GPTConfig, TinyGPT

D, L, H, T, B, V = 128, 2, 4, 128, 32, 256


def build():
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=D))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    return model, opt



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=8, help="alternating rounds (steps x rounds should cover 200)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps before timing")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--skip-mode", default="auto", help="Guard skip_mode: auto (sync on CPU), mask, sync")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, V, (16, B, T + 1), generator=g)

    plain_model, plain_opt = build()
    guard_model, guard_opt = build()
    tmp = tempfile.TemporaryDirectory()
    guard = Guard(guard_model, guard_opt, policy="rollback", ckpt_dir=tmp.name, skip_mode=args.skip_mode)
    guard_steps = guard.steps(10**9)
    plain_i = 0
    inside = {"guard": 0.0, "optimizer": 0.0}
    t_opt = [0.0]
    guard_opt.register_step_pre_hook(lambda *a: t_opt.__setitem__(0, time.perf_counter()))
    guard_opt.register_step_post_hook(
        lambda *a: inside.__setitem__("optimizer", inside["optimizer"] + time.perf_counter() - t_opt[0]))

    def plain(n: int) -> float:
        nonlocal plain_i
        t0 = time.perf_counter()
        for _ in range(n):
            batch = data[plain_i % len(data)]
            plain_i += 1
            _, loss = plain_model(batch[:, :-1], batch[:, 1:])
            loss.backward()
            plain_opt.step()
            plain_opt.zero_grad(set_to_none=True)
        float(loss.detach())
        return time.perf_counter() - t0

    def guarded(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            t1 = time.perf_counter()
            i = next(guard_steps)
            inside["guard"] += time.perf_counter() - t1
            batch = data[i % len(data)]
            _, loss = guard_model(batch[:, :-1], batch[:, 1:])
            loss.backward()
            t1 = time.perf_counter()
            guard.step(loss)
            inside["guard"] += time.perf_counter() - t1
        float(loss.detach())
        return time.perf_counter() - t0

    plain(args.warmup)
    guarded(args.warmup)
    inside.update(guard=0.0, optimizer=0.0)
    totals = {"plain": 0.0, "guarded": 0.0}
    per_round = []
    for r in range(args.rounds):
        order = [("plain", plain), ("guarded", guarded)]
        times = {}
        for name, fn in order if r % 2 == 0 else order[::-1]:
            times[name] = fn(args.steps)
            totals[name] += times[name]
        per_round.append(times["guarded"] / times["plain"])
    guard.flush()
    guard._writer.drain()
    stats = guard.stats

    # the pieces, timed on their own
    t0 = time.perf_counter()
    payload = capture(guard.step_count, len(guard.rollbacks), guard.model, guard.optimizer, guard.stateful, guard._window)
    ring_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    _atomic_save(payload, f"{tmp.name}/bench-snapshot.pt")
    disk_ms = (time.perf_counter() - t0) * 1e3
    n_params = sum(p.numel() for p in guard_model.parameters())
    tmp.cleanup()

    n = args.steps * args.rounds
    cfg = guard.config
    print(f"CPU: {cpu_model()} | torch {torch.__version__} | threads {torch.get_num_threads()} | load avg {loadavg()}")
    print(f"model: d={D} L={L} H={H} T={T} B={B} V={V}, {n_params:,} params; AdamW (wd 0.1)")
    print(f"Guard: policy rollback, skip_mode {guard.skip_mode}, interval {cfg.interval}, ring {cfg.ring_size}, "
          f"disk every {cfg.disk_interval}, window {cfg.window}")
    print(f"timed: {args.rounds} alternating rounds x {args.steps} steps (after {args.warmup} warm-up steps); "
          f"guarded run took {stats['checkpoints']} in-memory checkpoints, {stats['disk_snapshots']} disk snapshots, "
          f"skipped {stats['skipped_steps']} steps")
    print(f"  unguarded {1e3 * totals['plain'] / n:8.2f} ms/step")
    print(f"  guarded   {1e3 * totals['guarded'] / n:8.2f} ms/step")
    print(f"  one in-memory checkpoint {ring_ms:.1f} ms; one snapshot write (background thread) {disk_ms:.1f} ms")
    own = (inside["guard"] - inside["optimizer"]) / n
    plain_ms = 1e3 * totals["plain"] / n
    print(f"  time inside the Guard (without the optimizer step it calls): {1e3 * own:.2f} ms/step")
    print(f"  per-round wall-clock ratios: {', '.join(f'{x:.3f}' for x in per_round)}")
    print(f"guarded / unguarded time per step: wall clock {totals['guarded'] / totals['plain']:.3f}, "
          f"direct {(plain_ms + 1e3 * own) / plain_ms:.4f}")


if __name__ == "__main__":
    main()
