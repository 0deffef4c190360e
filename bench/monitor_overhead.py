"""Per-step overhead of seismo's Monitor on CPU: monitored / unmonitored step time.

    python bench/monitor_overhead.py [--models tinygpt,gpt2-sdpa,gpt2-eager] [--rounds 25]
                                     [--block 20] [--warmup 5] [--threads 1] [--probe-batch 4] [--no-full]

For each model, four copies with the same initialisation train on the same batches in the same
process (forward, loss, ``zero_grad``, backward, AdamW step):

* ``plain``   - no monitor: the baseline;
* ``plain-2`` - a second unmonitored copy, the A/A control: its ratio to ``plain`` shows how far
  two identical loops drift apart on this machine during the run (the noise floor);
* ``default`` - ``Monitor(model, opt, probes="default")``: loss, gradient, attention, logit and
  activation signals every step, update norms and Adam state every 10 steps;
* ``full/64`` - ``Monitor(model, opt, probes="full", every=64, probe_loss=...)``: every probe every
  64 steps, plus the curvature (Hessian) probe on a fixed probe batch of ``--probe-batch``
  sequences, which by design runs every ``max(64, curvature_every=500) = 500`` steps (the
  default rounds x block = 500 timed steps after 5 warm-up steps, so step 500 is timed).

Training goes in blocks of ``--block`` steps, rotating which copy goes first each round, so load
from other processes hits all copies alike. Each loop keeps running across blocks, so tracked
steps occur at exactly their scheduled rate. Every step is timed on its own (CPU ops are
synchronous) and labelled with the probes tracked at that step. Three ratios are reported:

* **wall**: amortized monitored step time / median plain step time, wall clock. The amortized
  time is the sum over kinds of step (untracked, tracked by the 10-step probes, by the Hessian
  probe, ...) of (long-run fraction of that kind under the schedules) x (its median time):
  medians shrug off load bursts, the fractions make rare expensive steps (the Hessian every 100
  steps) count at their true rate, which a median over all steps would hide.
* **cpu**: the same with the CPU time of the training thread (``time.thread_time``; with
  ``--threads 1`` all of torch's work runs on it). Time slices taken by other processes do not
  count, but sharing a core (SMT) with them still slows every op.
* **direct**: the CPU time spent inside the monitor's own code - ``Monitor.step`` (which
  collects the probes and runs the Hessian probe), every probe hook (through ``HookSet.guard``),
  TinyGPT's attention-logit tap and the interception of Hugging Face attention calls - amortized
  the same way and added to the plain step: (plain + monitor code) / plain. It only times the
  monitor's code, so it is much less sensitive to load, but it misses indirect costs (e.g. caches
  evicted by the monitor's temporaries); compare it with the other two.

Models: seismo's TinyGPT in the demo configuration (d=128, 2 layers, 4 heads, T=128, B=32,
vocabulary 256) and Hugging Face ``GPT2LMHeadModel`` with a tiny random config of the same sizes
(n_layer=2, n_head=4, n_embd=128, n_positions=128, vocab_size=256, dropout 0), with
``attn_implementation`` "sdpa" and "eager". Goals (from the issue): default every step <= 1.05x,
full every 64 steps <= 1.10x.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import statistics
import time
import warnings
from typing import Callable

import torch
import torch.nn as nn
from _machine import cpu_model, loadavg

from seismo.proxy.loop import train_step

D, L, H, T, B, V = 128, 2, 4, 128, 32, 256
PROBE_B = 4
MODELS = ("tinygpt", "gpt2-sdpa", "gpt2-eager")
GOALS = {"default": 1.05, "full/64": 1.10}


# --- timing of the monitor's own code -------------------------------------------------------
class CodeTimer:
    """CPU time spent inside wrapped callables; nested wrapped calls are counted once."""

    def __init__(self) -> None:
        self.total = 0.0
        self._depth = 0

    def wrap(self, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            c0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += time.thread_time() - c0
                self._depth -= 1

        return timed


TIMER = CodeTimer()


def instrument() -> None:
    """Route the monitor's entry points through TIMER (before any Monitor is built)."""
    import seismo.monitor.attention.interception as sites
    import seismo.monitor.monitor as monitor_mod
    import seismo.monitor.probe as probe_mod
    from seismo.proxy.model import CausalSelfAttention

    guard = probe_mod.HookSet.guard
    probe_mod.HookSet.guard = lambda self, fn: TIMER.wrap(guard(self, fn))  # every probe hook
    monitor_mod.Monitor.step = TIMER.wrap(monitor_mod.Monitor.step)  # collect, arm, queue, flush, Hessian
    sites._dispatch = TIMER.wrap(sites._dispatch)  # HF / SDPA attention logits
    CausalSelfAttention._emit_logits = TIMER.wrap(CausalSelfAttention._emit_logits)  # TinyGPT's tap


# --- models -------------------------------------------------------------------------------
def build_tinygpt() -> tuple[nn.Module, Callable[[nn.Module, torch.Tensor], torch.Tensor]]:
    from seismo.proxy.model import GPTConfig, TinyGPT

    model = TinyGPT(GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=D))

    def loss_of(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return m(batch[:, :-1], batch[:, 1:])[1]

    return model, loss_of


def build_gpt2(impl: str):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = GPT2Config(
        n_layer=L, n_head=H, n_embd=D, n_positions=T, vocab_size=V,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        attn_implementation=impl,
    )
    model = GPT2LMHeadModel(cfg)
    assert model.config._attn_implementation == impl, model.config._attn_implementation

    def loss_of(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        x = batch[:, :-1]
        return m(input_ids=x, labels=x).loss  # HF shifts the labels itself

    return model, loss_of


def build(name: str):
    torch.manual_seed(0)
    if name == "tinygpt":
        model, loss_of = build_tinygpt()
    elif name.startswith("gpt2-"):
        model, loss_of = build_gpt2(name.split("-", 1)[1])
    else:
        raise SystemExit(f"unknown model {name!r}; choose from {MODELS}")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    return model, opt, loss_of


# --- one training loop ----------------------------------------------------------------------
class Loop:
    """One model copy; ``run(n)`` trains n more steps and times each one."""

    def __init__(self, name: str, model_name: str, data: torch.Tensor, probe_batch: torch.Tensor, setting: str | None):
        from seismo.monitor import Monitor

        self.name = name
        self.model, self.opt, self.loss_of = build(model_name)
        self.data = data
        self.i = 0
        self.monitor = None
        if setting == "default":
            self.monitor = Monitor(self.model, self.opt, probes="default")
        elif setting == "full/64":
            loss_of = self.loss_of
            self.monitor = Monitor(
                self.model, self.opt, probes="full", every=64, probe_loss=lambda m: loss_of(m, probe_batch)
            )
        # per timed step: kind of step, wall seconds, CPU seconds, CPU seconds inside monitor code
        self.steps: list[tuple[str, float, float, float]] = []

    def kind(self, step: int) -> str:
        if self.monitor is None:
            return "plain"
        names = [p.name for p in self.monitor.probes if p.schedule(step)]
        return "+".join(names) if names else "untracked"

    def run(self, n: int, record: bool = True) -> None:
        for _ in range(n):
            kind = self.kind(self.monitor.step_count) if self.monitor is not None else "plain"
            batch = self.data[self.i % len(self.data)]
            self.i += 1
            k0, c0, t0 = TIMER.total, time.thread_time(), time.perf_counter()
            train_step(self.model, self.opt, self.loss_of, batch, monitor=self.monitor)
            dt, dc, dk = time.perf_counter() - t0, time.thread_time() - c0, TIMER.total - k0
            if record:
                self.steps.append((kind, dt, dc, dk))

    def fractions(self, horizon: int = 9600) -> dict[str, float]:
        """Long-run fraction of each kind of step under the probes' schedules."""
        counts: dict[str, int] = {}
        for s in range(horizon):
            k = self.kind(s)
            counts[k] = counts.get(k, 0) + 1
        return {k: c / horizon for k, c in counts.items()}


CLOCKS = {"wall": 1, "cpu": 2, "code": 3}  # index into Loop.steps rows


def amortized(loop: Loop, clock: str) -> tuple[float, dict[str, tuple[int, float, float, bool]]]:
    """(amortized time per step, {kind: (samples, median, long-run fraction, estimated)}).

    A kind of step not seen in the timed window is estimated additively from the kinds it is
    made of (e.g. the 64- and 100-step schedules coinciding, 1 step in 1600: untracked + the
    extra of a 64-step step + the extra of a Hessian step). If that is impossible the result is
    nan: the window was too short (use rounds x block >= 500)."""
    col = CLOCKS[clock]
    by_kind: dict[str, list[float]] = {}
    for row in loop.steps:
        by_kind.setdefault(row[0], []).append(row[col])
    med = {k: statistics.median(v) for k, v in by_kind.items()}
    frac = loop.fractions()
    base_kind = max(frac, key=frac.get)  # the most common kind of step
    base = med.get(base_kind)
    total = 0.0
    table = {}
    for k, f in frac.items():
        estimated = k not in med
        if not estimated:
            m = med[k]
        else:
            want = set(k.split("+"))
            parts = [kk for kk in med if kk != base_kind and set(kk.split("+")) <= want]
            covered = set().union(*(set(p.split("+")) for p in parts)) if parts else set()
            if base is not None and base_kind == "untracked" and covered == want:
                m = base + sum(med[p] - base for p in parts)
            else:
                m = math.nan
        total += f * m
        table[k] = (len(by_kind.get(k, [])), m, f, estimated)
    return total, table


# --- reporting ------------------------------------------------------------------------------


def median_of(loop: Loop, clock: str) -> float:
    return statistics.median(row[CLOCKS[clock]] for row in loop.steps)


def bench_model(model_name: str, args) -> list[tuple]:
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, V, (8, B, T + 1), generator=g)
    probe_batch = torch.randint(0, V, (args.probe_batch, T + 1), generator=g)
    loops = [
        Loop("plain", model_name, data, probe_batch, None),
        Loop("plain-2", model_name, data, probe_batch, None),
        Loop("default", model_name, data, probe_batch, "default"),
    ]
    if not args.no_full:
        loops.append(Loop("full/64", model_name, data, probe_batch, "full/64"))
    print(f"\n== {model_name}: {args.rounds} rounds x {args.block} steps per loop, load before: {loadavg()}", flush=True)
    if not args.no_full:
        full = loops[3].monitor
        hess = [p for p in full.probes if p.name == "hessian"]
        print(f"   full/64 probes: {[p.name for p in full.probes]}; the Hessian probe runs at steps "
              f"{[s for s in range(0, 1001) if hess and hess[0].schedule(s)]} (every max(64, 500) = 500 by design)")
    for lp in loops:  # includes step 0, where every probe (and the Hessian) runs once
        lp.run(args.warmup, record=False)
    t_start = time.time()
    n = len(loops)
    for r in range(args.rounds):
        order = loops[r % n:] + loops[: r % n]
        for lp in order if r % 2 == 0 else order[::-1]:
            lp.run(args.block)
        if args.verbose:
            med = ", ".join(f"{lp.name} {1e3 * statistics.median(row[1] for row in lp.steps[-args.block:]):.0f}" for lp in loops)
            print(f"   round {r + 1:2d} (median wall ms) {med}; load {loadavg()}", flush=True)
    for lp in loops:
        if lp.monitor is not None:
            lp.monitor.close()
    print(f"   load after: {loadavg()}  ({time.time() - t_start:.0f} s)")

    plain = loops[0]
    p_wall, p_cpu = median_of(plain, "wall"), median_of(plain, "cpu")
    print(f"   plain: median {1e3 * p_wall:.1f} ms/step wall, {1e3 * p_cpu:.1f} ms/step CPU over {len(plain.steps)} steps; "
          f"monitor code in the plain loop (global attention patches of the other monitors): "
          f"{1e3 * statistics.mean(r[3] for r in plain.steps):.3f} ms/step")
    aa_wall, aa_cpu = median_of(loops[1], "wall") / p_wall, median_of(loops[1], "cpu") / p_cpu
    print(f"   A/A control plain-2 / plain: wall {aa_wall:.3f}x, cpu {aa_cpu:.3f}x")
    rows = [(model_name, "plain-2 (A/A)", aa_wall, aa_cpu, math.nan, math.nan)]
    for lp in loops[2:]:
        wall, wall_table = amortized(lp, "wall")
        cpu, cpu_table = amortized(lp, "cpu")
        code, code_table = amortized(lp, "code")
        direct = (p_cpu + code) / p_cpu
        hess_code = sum(f * m for k, (_, m, f, _) in code_table.items() if "hessian" in k.split("+"))
        print(f"   {lp.name}: wall {wall / p_wall:.3f}x, cpu {cpu / p_cpu:.3f}x, direct {direct:.3f}x "
              f"(monitor code {1e3 * code:.2f} ms/step amortized"
              + (f", of which the Hessian probe {1e3 * hess_code:.2f} ms/step = {hess_code / p_cpu:.3f}x" if hess_code else "")
              + f"); goal <= {GOALS[lp.name]:.2f}x")
        print(f"      {'kind of step':<46} {'steps':>5} {'fraction':>8} {'wall ms':>8} {'cpu ms':>8} {'code ms':>8}")
        for k, (cnt, m_code, f, est) in sorted(code_table.items(), key=lambda kv: -kv[1][2]):
            mark = "*" if est else " "
            print(f"      {k:<46} {cnt:>5} {f:8.5f} {1e3 * wall_table[k][1]:8.1f}{mark}{1e3 * cpu_table[k][1]:8.1f}{mark}"
                  f"{1e3 * m_code:8.2f}{mark}")
        rows.append((model_name, lp.name, wall / p_wall, cpu / p_cpu, direct, hess_code / p_cpu))
    print("      (* = kind not seen in the window, estimated additively from its parts)")
    for lp in loops[2:]:
        if lp.monitor.disabled:
            print(f"   {lp.name}: disabled probes: {lp.monitor.disabled}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    ap.add_argument("--rounds", type=int, default=25, help="rounds; each runs one block of every loop")
    ap.add_argument("--block", type=int, default=20, help="steps per block")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per loop before timing")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--probe-batch", type=int, default=PROBE_B, help="sequences in the Hessian probe batch")
    ap.add_argument("--verbose", action="store_true", help="print per-round medians and load")
    ap.add_argument("--no-full", action="store_true", help="leave out the full/64 copy (plain, plain-2 and default only)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    instrument()
    print(f"machine: nproc={os.cpu_count()}, CPU {cpu_model()!r}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, python {platform.python_version()}")
    print(f"TinyGPT/GPT-2 d={D}, {L} layers, {H} heads, T={T}, B={B}, V={V}, AdamW; "
          f"Hessian probe batch {args.probe_batch}x{T}")
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name.strip(), args)
    print("\nsummary: monitored / plain per-step time (amortized over the schedules)")
    print(f"{'model':<11} {'setting':<14} {'wall':>7} {'cpu':>7} {'direct':>7} {'Hessian':>8}  goal")
    for model_name, setting, w, c, d, h in rows:
        goal = GOALS.get(setting)
        verdict = ""
        if goal is not None:
            missed = [name for name, x in (("wall", w), ("cpu", c), ("direct", d)) if not x <= goal]
            verdict = f"<= {goal:.2f}x: " + (f"missed by {', '.join(missed)}" if missed else "met")
        hs = f"{h:+.3f}" if h == h and h else ""
        ds = f"{d:6.3f}x" if d == d else "      -"
        print(f"{model_name:<11} {setting:<14} {w:6.3f}x {c:6.3f}x {ds} {hs:>8}  {verdict}")


if __name__ == "__main__":
    main()
