"""Per-step overhead of the TensorBoard, W&B and MLflow sinks on the monitored TinyGPT loop.

    python bench/sink_overhead.py [--sinks tensorboard,wandb,mlflow] [--steps 150] [--block 25]
                                  [--warmup 5] [--threads 1] [--flush-every 50]

Copies of TinyGPT in the demo configuration (d=128, 2 layers, 4 heads, T=128, B=32, vocabulary
256, AdamW) with the same initialisation train on the same batches in the same process, each
under ``seismo.Monitor(model, opt, probes="default", flush_every=...)``:

* ``monitor``   - no sink: the baseline;
* ``monitor-2`` - a second copy with no sink, the A/A control (the noise floor of this machine);
* one copy per sink: ``TensorBoard`` (an event file), ``WandB`` (``WANDB_MODE=offline``: the run
  is written by W&B's own service process, no network), ``MLflow`` (a local SQLite store, the
  default of MLflow 3, and the file store with ``--mlflow-store file``).

Training goes in blocks of ``--block`` steps, rotating which copy goes first each round, so load
from other processes hits all copies alike. Every step is timed; the Monitor hands a batch of
``--flush-every`` steps to its sinks at each flush, and the time spent inside each sink's
``write_records`` / ``write_events`` is timed as well. Printed per sink:

* **ratio (wall)**: amortized step time of the copy / that of ``monitor``. The amortized time is
  (1 - 1/F) x the median of the steps without a flush + 1/F x the median of the flush steps
  (F = ``--flush-every``): medians shrug off load bursts, the weights make the flush steps, where
  a sink's cost lands, count at their true rate. The plain ratio of means is printed as well;
  under load it drifts by several percent either way (compare the A/A control);
* **cpu**: the same with the CPU time of the training thread (``time.thread_time``; with
  ``--threads 1`` torch's work runs on it): time slices taken by other processes do not count;
* **direct**: (mean ``monitor`` step + the sink's own time per step) / mean ``monitor`` step:
  the sink's cost alone, much less sensitive to load; it misses work done off the training
  thread (W&B's service process, TensorBoard's writer thread);
* **ms per flush**: wall time inside the sink per flush (median over flushes, and the max);
* for W&B, the CPU time of its service process (``wandb-core``, which writes the run) per step,
  when psutil is installed: work done on another core, which a 2-core machine may not have free.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from _machine import cpu_model, loadavg

from seismo.proxy.loop import train_step


def _next_token_loss(model, batch):
    return model(batch[:, :-1], batch[:, 1:])[1]

D, L, H, T, B, V = 128, 2, 4, 128, 32, 256
SINKS = ("tensorboard", "wandb", "mlflow")


class TimedSink:
    """Wraps a sink and times its write calls (wall and CPU time of the calling thread)."""

    def __init__(self, sink):
        self.sink = sink
        self.name = type(sink).__name__
        self.flushes: list[tuple[float, int]] = []  # (wall seconds, records) per write_records call (one per flush)
        self.total_wall = 0.0

    def write_records(self, records):
        t0 = time.perf_counter()
        out = self.sink.write_records(records)
        dt = time.perf_counter() - t0
        self.total_wall += dt
        self.flushes.append((dt, len(records)))
        return out

    def write_events(self, events):
        t0 = time.perf_counter()
        self.sink.write_events(events)
        self.total_wall += time.perf_counter() - t0

    def flush(self):
        self.sink.flush()

    def set_status(self, status, meta=None):
        self.sink.set_status(status, meta)

    def close(self):
        self.sink.close()


def make_sink(kind: str, root: Path, name: str, mlflow_store: str):
    from seismo import sinks

    if kind == "tensorboard":
        return sinks.TensorBoard(root / "tb" / name)
    if kind == "wandb":
        return sinks.WandB(project="seismo-bench", name=name, dir=str(root))
    if kind == "mlflow":
        uri = f"sqlite:///{root}/mlflow.db" if mlflow_store == "sqlite" else f"file:{root}/mlruns"
        return sinks.MLflow(experiment="seismo-bench", run_name=name, tracking_uri=uri)
    raise SystemExit(f"unknown sink {kind!r}; choose from {SINKS}")


def service_cpu_seconds() -> float | None:
    """CPU seconds used so far by this process's children named wandb-core (None without psutil)."""
    try:
        import psutil
    except ImportError:
        return None
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            if "wandb-core" in child.name():
                t = child.cpu_times()
                total += t.user + t.system
        except psutil.Error:
            pass
    return total


def amortized_shifted(steps: list[float], flush_every: int, offset: int) -> float:
    """(1 - 1/F) x median of the steps without a flush + 1/F x median of the flush steps; recorded
    step i is the Monitor's step ``offset + i``, which flushes when ``(offset + i + 1) % F == 0``."""
    flush = [t for i, t in enumerate(steps) if (offset + i + 1) % flush_every == 0]
    other = [t for i, t in enumerate(steps) if (offset + i + 1) % flush_every != 0]
    if not flush:
        return statistics.median(other)
    return (1 - 1 / flush_every) * statistics.median(other) + statistics.median(flush) / flush_every


class Loop:
    """One model copy under a Monitor; ``run(n)`` trains n more steps and times each one."""

    def __init__(self, name: str, data: torch.Tensor, flush_every: int, sink=None):
        import seismo
        from seismo.proxy.model import GPTConfig, TinyGPT

        torch.manual_seed(0)
        self.name = name
        self.model = TinyGPT(GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=D))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
        self.sink = TimedSink(sink) if sink is not None else None
        self.monitor = seismo.Monitor(self.model, self.opt, probes="default", flush_every=flush_every,
                                      sinks=[self.sink] if self.sink is not None else [])
        self.data = data
        self.i = 0
        self.steps: list[float] = []  # wall seconds per timed step
        self.cpu: list[float] = []  # CPU seconds of the training thread per timed step

    def run(self, n: int, record: bool = True) -> None:
        for _ in range(n):
            batch = self.data[self.i % len(self.data)]
            self.i += 1
            t0, c0 = time.perf_counter(), time.thread_time()
            train_step(self.model, self.opt, _next_token_loss, batch, monitor=self.monitor)
            if record:
                self.steps.append(time.perf_counter() - t0)
                self.cpu.append(time.thread_time() - c0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sinks", default=",".join(SINKS), help=f"comma-separated subset of {SINKS}")
    ap.add_argument("--steps", type=int, default=150, help="timed steps per copy (a multiple of --block)")
    ap.add_argument("--block", type=int, default=25, help="steps per block")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per copy before timing")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--flush-every", type=int, default=50, help="the Monitor's flush interval (its default: 50)")
    ap.add_argument("--mlflow-store", choices=("sqlite", "file"), default="sqlite", help="MLflow's local store")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    root = Path(tempfile.mkdtemp(prefix="seismo-sink-bench-"))
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(root), WANDB_CONFIG_DIR=str(root / "wandb-config"),
                      WANDB_CACHE_DIR=str(root / "wandb-cache"), WANDB_DATA_DIR=str(root / "wandb-data"), WANDB_DISABLE_GIT="true",
                      MLFLOW_ALLOW_FILE_STORE="true")
    print(f"machine: nproc={os.cpu_count()}, CPU {cpu_model()!r}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"python {platform.python_version()}")
    print(f"TinyGPT d={D}, {L} layers, {H} heads, T={T}, B={B}, V={V}, AdamW; Monitor probes='default', flush_every={args.flush_every}; "
          f"{args.steps} timed steps per copy in blocks of {args.block}; load before: {loadavg()}", flush=True)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, V, (8, B, T + 1), generator=g)
    loops = [Loop("monitor", data, args.flush_every), Loop("monitor-2", data, args.flush_every)]
    for kind in args.sinks.split(","):
        kind = kind.strip()
        loops.append(Loop(kind, data, args.flush_every, make_sink(kind, root, kind, args.mlflow_store)))
    for lp in loops:
        lp.run(args.warmup, record=False)
    wandb_cpu0 = service_cpu_seconds()
    t_start = time.time()
    rounds = max(1, args.steps // args.block)
    n = len(loops)
    for r in range(rounds):
        order = loops[r % n:] + loops[: r % n]
        for lp in order if r % 2 == 0 else order[::-1]:
            lp.run(args.block)
    wandb_cpu = service_cpu_seconds()
    wandb_cpu = wandb_cpu - wandb_cpu0 if wandb_cpu is not None and wandb_cpu0 is not None else None
    for lp in loops:
        lp.monitor.close()
    print(f"load after: {loadavg()} ({time.time() - t_start:.0f} s); {len(loops[0].monitor.history)} signals", flush=True)

    F = args.flush_every
    offset = args.warmup  # recorded step i is the Monitor's step warmup + i; it flushes after steps F-1, 2F-1, ...

    def amort(lp, cpu=False):
        return amortized_shifted(lp.cpu if cpu else lp.steps, F, offset)

    base, base_mean, base_cpu = amort(loops[0]), statistics.mean(loops[0].steps), amort(loops[0], cpu=True)
    print(f"\nmonitor (no sink): amortized {1e3 * base:.1f} ms/step, mean {1e3 * base_mean:.1f}, "
          f"median {1e3 * statistics.median(loops[0].steps):.1f} over {len(loops[0].steps)} steps")
    print(f"{'copy':<12} {'ratio (wall)':>12} {'(means)':>8} {'cpu':>8} {'direct':>8} {'ms/flush (median)':>18} {'ms/flush (max)':>15} "
          f"{'flushes':>8}")
    lp = loops[1]
    print(f"{'monitor-2':<12} {amort(lp) / base:11.3f}x {statistics.mean(lp.steps) / base_mean:7.3f}x "
          f"{amort(lp, cpu=True) / base_cpu:7.3f}x {'':>8} {'(A/A control)':>18}")
    for lp in loops[2:]:
        s = lp.sink
        per_step = s.total_wall / max(1, len(lp.steps) + args.warmup)
        flushes = [dt for dt, n in s.flushes if n == F] or [dt for dt, _ in s.flushes]  # full flushes
        print(f"{lp.name:<12} {amort(lp) / base:11.3f}x {statistics.mean(lp.steps) / base_mean:7.3f}x "
              f"{amort(lp, cpu=True) / base_cpu:7.3f}x {(base + per_step) / base:7.3f}x "
              f"{1e3 * statistics.median(flushes):18.1f} {1e3 * max(flushes):15.1f} {len(flushes):8d}"
              + (f"  (off: {s.sink.disabled})" if getattr(s.sink, "disabled", None) else ""))
    if wandb_cpu is not None and any(lp.name == "wandb" for lp in loops):
        n = len(next(lp for lp in loops if lp.name == "wandb").steps)
        print(f"W&B service process (wandb-core): {1e3 * wandb_cpu / n:.1f} ms CPU per step "
              f"({wandb_cpu / n / base:.3f}x a monitored step), on the other core when it is free")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
