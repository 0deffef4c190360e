"""Per-step overhead of Cockpit's ``economy`` configuration next to seismo's Monitor, on a small MLP.

Runs in a separate virtual environment so that seismo's own stays clean:

    python3 -m venv /tmp/cockpit-venv
    /tmp/cockpit-venv/bin/pip install -q torch==2.13.0 cockpit-for-pytorch backpack-for-pytorch "setuptools<81"
    /tmp/cockpit-venv/bin/python bench/cockpit_overhead.py [--rounds 12] [--block 25] [--threads 1]

(``import cockpit`` needs ``pkg_resources``, hence ``setuptools<81``; seismo is imported from this
checkout by putting the repository root on ``sys.path``.)

Model: an MLP 784-128-64-10 with ReLU, batch 128 of random data (a fixed set of 16 batches),
cross-entropy, ``torch.optim.SGD(lr=0.01)`` with default arguments (Cockpit's ``Alpha`` quantity
only knows the update of plain SGD). Five copies with the same initialisation train in the same
process, in blocks of ``--block`` steps, rotating which goes first each round:

* ``plain``            - zero_grad, forward, loss, backward, step;
* ``cockpit-economy``  - Cockpit with ``configuration("economy")`` tracked every step (Alpha,
  Distance, GradHist1d, GradNorm, InnerTest, Loss, NormTest, OrthoTest, UpdateSize), the loop
  written as in Cockpit's documentation (``extend`` model and loss, individual losses, ``with
  cockpit(step, info=...)`` around ``backward(create_graph=cockpit.create_graph(step))``);
* ``cockpit-basic``    - Cockpit with only the quantities seismo also records: Loss, GradNorm,
  Distance, UpdateSize, every step (same loop);
* ``seismo-comparable``- ``Monitor`` with ``LossProbe``, ``GradientProbe``, ``UpdateProbe`` every
  step (loss, grad norms per layer and global, update and parameter norms, update/parameter ratio);
* ``seismo-default``   - ``Monitor(model, opt, probes="default")``: on this model that is loss,
  gradients and output logits every step, update norms every 10 steps (attention and activation
  probes have nothing to attach to, the Adam probe is off for SGD).

Reported: median per-step time of each and the ratio to ``plain``. Every step is timed on its own,
both wall clock and CPU time of the training thread (``time.thread_time``; with ``--threads 1``
it does not count time stolen by other processes).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from _machine import cpu_model, loadavg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # seismo from this checkout

B, SIZES, N_BATCHES = 128, (784, 128, 64, 10), 16


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    d0, d1, d2, d3 = SIZES
    return nn.Sequential(nn.Linear(d0, d1), nn.ReLU(), nn.Linear(d1, d2), nn.ReLU(), nn.Linear(d2, d3))


class Loop:
    def __init__(self, name: str, data: tuple[torch.Tensor, torch.Tensor]):
        self.name = name
        self.model = make_mlp()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.loss_fn = nn.CrossEntropyLoss()
        self.xs, self.ys = data
        self.i = 0
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.setup()

    def setup(self) -> None:
        pass

    def one_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad()
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        self.opt.step()

    def run(self, n: int, record: bool = True) -> None:
        for _ in range(n):
            k = self.i % N_BATCHES
            x, y = self.xs[k], self.ys[k]
            c0, t0 = time.thread_time(), time.perf_counter()
            self.one_step(x, y)
            dt, dc = time.perf_counter() - t0, time.thread_time() - c0
            self.i += 1
            if record:
                self.wall.append(dt)
                self.cpu.append(dc)


class CockpitLoop(Loop):
    quantities = "economy"

    def setup(self) -> None:
        from backpack import extend
        from cockpit import Cockpit, quantities
        from cockpit.utils.configuration import configuration

        self.model = extend(self.model)
        self.loss_fn = extend(nn.CrossEntropyLoss(reduction="mean"))
        self.individual_loss_fn = nn.CrossEntropyLoss(reduction="none")
        if self.quantities == "economy":
            qs = configuration("economy")
        else:  # the quantities seismo also records, every step
            from cockpit.utils.schedules import linear

            every = linear(interval=1)
            qs = [quantities.Loss(every), quantities.GradNorm(every), quantities.Distance(every), quantities.UpdateSize(every)]
        self.cockpit = Cockpit(self.model.parameters(), quantities=qs)
        self.tracked = sorted(type(q).__name__ for q in qs)

    def one_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        step = self.i
        self.opt.zero_grad()
        outputs = self.model(x)
        loss = self.loss_fn(outputs, y)
        losses = self.individual_loss_fn(outputs, y)
        info = {"batch_size": x.shape[0], "individual_losses": losses, "loss": loss, "optimizer": self.opt}
        with self.cockpit(step, info=info):
            loss.backward(create_graph=self.cockpit.create_graph(step))
        self.opt.step()


class CockpitBasicLoop(CockpitLoop):
    quantities = "basic"


class SeismoLoop(Loop):
    preset = "comparable"

    def setup(self) -> None:
        from seismo.monitor import GradientProbe, LossProbe, Monitor, UpdateProbe, every

        if self.preset == "default":
            self.monitor = Monitor(self.model, self.opt, probes="default")
        else:
            probes = [LossProbe(schedule=every(1)), GradientProbe(schedule=every(1)), UpdateProbe(schedule=every(1))]
            self.monitor = Monitor(self.model, self.opt, probes=probes)
        self.tracked = [p.name for p in self.monitor.probes]

    def one_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad()
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        self.opt.step()
        self.monitor.step(loss)


class SeismoDefaultLoop(SeismoLoop):
    preset = "default"




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--block", type=int, default=25, help="steps per block")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    try:
        from importlib.metadata import version

        import backpack
        import cockpit

        versions = f"cockpit-for-pytorch {version('cockpit-for-pytorch')}, backpack-for-pytorch {version('backpack-for-pytorch')}"
    except Exception as exc:  # noqa: BLE001 - any import failure: report it, do not fake numbers
        raise SystemExit(f"cannot import Cockpit/BackPACK: {type(exc).__name__}: {exc}") from None
    del backpack, cockpit
    print(f"machine: nproc={os.cpu_count()}, CPU {cpu_model()!r}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"python {platform.python_version()}; {versions}")
    print(f"MLP {'-'.join(map(str, SIZES))} ReLU, batch {B}, SGD(lr=0.01); {args.rounds} rounds x {args.block} steps; load before: {loadavg()}")

    g = torch.Generator().manual_seed(0)
    data = (torch.randn(N_BATCHES, B, SIZES[0], generator=g), torch.randint(0, SIZES[-1], (N_BATCHES, B), generator=g))
    loops = [Loop("plain", data), CockpitLoop("cockpit-economy", data), CockpitBasicLoop("cockpit-basic", data),
             SeismoLoop("seismo-comparable", data), SeismoDefaultLoop("seismo-default", data)]
    for lp in loops:
        lp.run(args.warmup, record=False)
    t_start = time.time()
    for r in range(args.rounds):
        order = loops[r % len(loops):] + loops[: r % len(loops)]
        for lp in order if r % 2 == 0 else order[::-1]:
            lp.run(args.block)
    print(f"load after: {loadavg()} ({time.time() - t_start:.0f} s)")

    # the runs must agree: same init, same batches, same optimizer -> same weights
    ref = [p.detach() for p in loops[0].model.parameters()]
    for lp in loops[1:]:
        diff = max(float((p.detach() - q).abs().max()) for p, q in zip(lp.model.parameters(), ref))
        if diff > 1e-5:
            print(f"warning: {lp.name} ended {diff:.2e} away from the plain run's weights")

    p_wall, p_cpu = statistics.median(loops[0].wall), statistics.median(loops[0].cpu)
    print(f"\n{'loop':<18} {'wall ms/step':>12} {'ratio':>8} {'CPU ms/step':>12} {'ratio':>8}  tracked every step")
    for lp in loops:
        w, c = statistics.median(lp.wall), statistics.median(lp.cpu)
        what = ", ".join(getattr(lp, "tracked", [])) or "-"
        print(f"{lp.name:<18} {1e3 * w:12.3f} {w / p_wall:7.2f}x {1e3 * c:12.3f} {c / p_cpu:7.2f}x  {what}")
    for lp in loops:
        if isinstance(lp, SeismoLoop) and lp.monitor.disabled:
            print(f"{lp.name}: probes off on this model: {sorted(lp.monitor.disabled)}")
    eco = next(lp for lp in loops if lp.name == "cockpit-economy")
    out = eco.cockpit.get_output()
    got = {k for step in out.values() for k in step}
    print(f"cockpit-economy recorded {len(out)} steps with quantities {sorted(got)}")


if __name__ == "__main__":
    main()
