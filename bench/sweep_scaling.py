"""Sweep throughput: trials per hour with 1 and 2 local workers and with Ray (2 workers), as a
ratio to 1 local worker measured in the same run. The goal is >= 0.8 x N for N workers.

    python bench/sweep_scaling.py [--trials 16] [--steps 600] [--rounds 1] [--no-ray]

Every configuration runs the same sweep (``--trials`` learning rates of the ``xs`` TinyGPT, one
intervention, ``--steps`` steps each: a few seconds per trial) into a fresh run store with
:func:`seismo.proxy.run_sweep`, the code path of ``seismo sweep``. Two numbers per configuration:

* end to end: trials / wall time of the whole call, start-up included (the process pool's spawn
  and imports, or ``ray.init``; each new worker process also pays torch's lazy import of
  ``torch._dynamo`` on its first optimizer, a few seconds);
* steady state: the trials finished after the first round / the time they took, i.e. without the
  start-up, which is what a long sweep sees.

With ``--rounds R`` the configurations run in alternating rounds and the best round of each is
reported, so a burst of load from other processes hurts all alike. Results do not depend on the
backend (the tests check them bitwise), only the speed does.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from _machine import cpu_model, loadavg

from seismo.proxy.sweep import SweepConfig, run_sweep
from seismo.proxy.sweep_presets import SIZES


def make_sweep(n_trials: int, steps: int) -> SweepConfig:
    lrs = [float(x) for x in torch.logspace(-3.5, -1.0, n_trials, dtype=torch.float64).tolist()]
    return SweepConfig(
        name="bench-scaling", lrs=lrs, sizes={"xs": SIZES["xs"]}, interventions={"baseline": []},
        overrides=[f"steps={steps}", "batch_size=8", "model.block_size=32", "optim.warmup_steps=10", "eval_every=0",
                   "eval_batches=2", "data.max_bytes=300000", f"log_every={min(25, steps)}"],
    )


def measure(sweep: SweepConfig, backend: str, workers: int) -> dict:
    """Run the sweep once into a fresh store; return wall time and the finishing times."""
    finished: list[float] = []

    def on_progress(done, total, running, trial):
        if trial is not None:
            finished.append(time.perf_counter())

    with tempfile.TemporaryDirectory(prefix="seismo-bench-") as tmp:
        t0 = time.perf_counter()
        ids = run_sweep(sweep, Path(tmp) / "seismo.sqlite", workers=workers, backend=backend, on_progress=on_progress)
        wall = time.perf_counter() - t0
    n = len(ids)
    assert n == len(sweep.lrs), f"{backend}/{workers}: {n} trials finished"
    first_round = finished[min(workers, n) - 1]
    steady_n = n - min(workers, n)
    steady = steady_n / (finished[-1] - first_round) * 3600 if steady_n and finished[-1] > first_round else float("nan")
    return dict(wall=wall, per_hour=n / wall * 3600, steady_per_hour=steady)


def run_round(r: int, configs, sweep: SweepConfig, best: dict) -> None:
    for backend, workers in configs:
        m = measure(sweep, backend, workers)
        print(f"  round {r + 1}: {backend:<5} x{workers}: {m['wall']:6.1f} s, {m['per_hour']:6.0f} trials/h end to end, "
              f"{m['steady_per_hour']:6.0f} trials/h steady", flush=True)
        b = best.setdefault((backend, workers), m)  # best end to end and best steady state, each on its own
        b.update(wall=min(b["wall"], m["wall"]), per_hour=max(b["per_hour"], m["per_hour"]),
                 steady_per_hour=max(b["steady_per_hour"], m["steady_per_hour"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray backend")
    args = ap.parse_args()

    configs = [("local", 1), ("local", 2)]
    ray_version = "not installed"
    if not args.no_ray:
        try:
            import ray

            ray_version = ray.__version__
            configs.append(("ray", 2))
        except ImportError:
            pass
    print(f"nproc {os.cpu_count()} | CPU: {cpu_model()} | torch {torch.__version__} | ray {ray_version} | "
          f"Python {platform.python_version()} | load avg before: {loadavg()}")
    sweep = make_sweep(args.trials, args.steps)
    print(f"sweep: {args.trials} trials (xs TinyGPT, {args.steps} steps, batch 8, T=32, one torch thread per trial), "
          f"best of {args.rounds} round(s)")

    # Ray's session files (logs, sockets) go to a private temp dir, removed at the end
    ray_tmp = None if "RAY_TMPDIR" in os.environ else tempfile.mkdtemp(prefix="seismo-bench-ray-", dir="/tmp")
    if ray_tmp:
        os.environ["RAY_TMPDIR"] = ray_tmp
    best: dict[tuple[str, int], dict] = {}
    try:
        for r in range(args.rounds):
            run_round(r, configs, sweep, best)
    finally:
        if ray_tmp:
            shutil.rmtree(ray_tmp, ignore_errors=True)

    base = best[("local", 1)]
    print(f"\n{'backend':<8}{'workers':>8}{'wall s':>9}{'trials/h':>10}{'x 1 worker':>12}{'steady trials/h':>17}{'x 1 worker':>12}"
          f"{'goal (0.8 N)':>14}")
    for (backend, workers), m in best.items():
        ratio, steady_ratio = m["per_hour"] / base["per_hour"], m["steady_per_hour"] / base["steady_per_hour"]
        print(f"{backend:<8}{workers:>8}{m['wall']:>9.1f}{m['per_hour']:>10.0f}{ratio:>11.2f}x{m['steady_per_hour']:>17.0f}"
              f"{steady_ratio:>11.2f}x{0.8 * workers:>13.1f}x")
    print(f"load avg after: {loadavg()}")


if __name__ == "__main__":
    main()
