"""Early warning as a distribution: how long before a late failure seismo's default detectors warn.

    python bench/early_warning.py [--rebuild] [--only NAME ...]

A set of proxy-lab TinyGPT runs (``seismo.proxy.train`` on the ``tiny`` preset) that fail late,
each with a stable twin, trained once and cached under ``bench/.cache/early_warning/``:

* **failing runs**: the learning rate rises linearly from 0 over the whole run (a warm-up as
  long as the run), with no qk-layernorm and no z-loss, so training is
  healthy at first and breaks once the lr passes what the model tolerates, hundreds to thousands
  of steps in. Seed, peak lr and width vary.
* **twins**: the same run with qk-layernorm, z-loss 1e-4 (Wortsman et al. 2023, arXiv
  2309.14322) and a quarter of the lr (qk-norm + z-loss alone only delayed the failure of this
  ramp); they do not fail, so their warnings are false warnings.

Each run's recorded monitor signals are replayed record by record through a fresh
``seismo.diagnose.Diagnoser`` with ``default_detectors()``; the step at which a ``warning`` or
``critical`` event is *emitted* is its warning step. Failure and lead time are defined in
``bench/_early_warning_score.py`` (failure: the smoothed loss 0.5 nats above its best so far for
100 steps, or a non-finite loss). Prints a markdown table per run and the distribution.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _early_warning_score import SEVERE, distribution, failure_step, lead_time, per_1000  # noqa: E402
from _machine import cpu_model  # noqa: E402

from seismo.diagnose.detectors import default_detectors  # noqa: E402
from seismo.diagnose.engine import Diagnoser  # noqa: E402
from seismo.diagnose.replay import records_of  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache" / "early_warning"
History = dict[str, tuple[np.ndarray, np.ndarray]]
MARGIN, SMOOTH, HOLD = 0.5, 25, 100
BURN_IN = 100  # as bench/detection.py: events before this step are early-training transients


@dataclass
class Run:
    name: str
    role: str  # "fail" (expected to fail late) or "twin" (its stable twin)
    pair: str  # the failing run's name (for a twin) or its own
    steps: int
    overrides: dict = field(default_factory=dict)
    note: str = ""


#: The ``tiny`` preset (d=64, 2 layers, 4 heads, T=64, B=8) with the lr rising linearly from 0 at
#: step 0 to ``lr_end`` at the last step (a warm-up as long as the run; ``optim.decay`` constant).
def ramp(lr_end: float, steps: int, seed: int, width: int = 64) -> dict:
    return {"optim.lr": lr_end, "optim.warmup_steps": steps, "optim.decay": "constant", "seed": seed, "model.n_embd": width}


#: The twin: qk-layernorm, z-loss 1e-4 and a quarter of the lr. Probing showed qk-norm + z-loss
#: alone does not make this ramp stable (the same model at the same lr fails ~250 steps later).
TWIN_LR_FACTOR = 0.25
STABLE = {"model.qk_norm": True, "z_loss": 1e-4}
STEPS = 1500
#: (lr at the last step, seed, width). Ten were planned; (1.2, 0, 32) was dropped before it was
#: trained, for time (the machine's load average was 7-14 while these were trained).
GRID = [
    (0.6, 0, 64), (0.6, 1, 64), (0.8, 0, 64), (0.8, 1, 64), (0.8, 2, 64),
    (1.2, 0, 64), (1.2, 1, 64), (0.8, 0, 32), (0.8, 1, 32),
]


def run_set() -> list[Run]:
    runs = []
    for lr_end, seed, width in GRID:
        name = f"lr{lr_end:g}_d{width}_s{seed}"
        runs.append(Run(name, "fail", name, STEPS, ramp(lr_end, STEPS, seed, width),
                        f"d={width}, seed {seed}, lr 0 -> {lr_end:g} linearly over {STEPS} steps"))
        runs.append(Run(name + "_twin", "twin", name, STEPS, {**ramp(lr_end * TWIN_LR_FACTOR, STEPS, seed, width), **STABLE},
                        f"qk-layernorm + z-loss 1e-4, lr 0 -> {lr_end * TWIN_LR_FACTOR:g}"))
    return runs


def _key(run: Run) -> str:
    blob = json.dumps(dict(steps=run.steps, overrides=run.overrides, v=1), sort_keys=True)
    return f"{run.name}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def build(run: Run) -> tuple[History, dict]:
    from seismo.proxy import train
    from seismo.proxy.config import set_field
    from seismo.proxy.presets import get_preset

    cfg = get_preset("tiny")
    cfg.steps, cfg.monitor, cfg.diagnose, cfg.eval_every, cfg.log_every = run.steps, "default", False, 0, 10
    for k, v in run.overrides.items():
        set_field(cfg, k, str(v).lower() if isinstance(v, bool) else str(v))
    t0, c0 = time.time(), time.thread_time()
    res = train(cfg)
    meta = dict(status=res.status, steps_done=res.steps_done, wall_s=time.time() - t0, cpu_s=time.thread_time() - c0)
    return {k: (np.asarray(s), np.asarray(v, dtype=np.float64)) for k, (s, v) in res.history.items()}, meta


def load_or_build(run: Run, rebuild: bool, log) -> tuple[History, dict]:
    path = CACHE / f"{_key(run)}.npz"
    if path.exists() and not rebuild:
        z = np.load(path, allow_pickle=False)
        meta = json.loads(str(z["__meta__"]))
        names = json.loads(str(z["__names__"]))
        return {n: (z[f"s{i}"], z[f"v{i}"]) for i, n in enumerate(names)}, meta
    log(f"training {run.name} ({run.steps} steps)")
    h, meta = build(run)
    names = sorted(h)
    CACHE.mkdir(parents=True, exist_ok=True)
    arrays = {f"s{i}": h[n][0] for i, n in enumerate(names)} | {f"v{i}": h[n][1] for i, n in enumerate(names)}
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, __meta__=json.dumps(meta), __names__=json.dumps(names), **arrays)
    os.replace(tmp, path)
    log(f"  {run.name}: {meta['status']} after {meta['steps_done']} steps, {meta['cpu_s']:.0f} s CPU, {meta['wall_s']:.0f} s wall")
    return h, meta


def emitted_events(h: History) -> list[tuple[int, object]]:
    """(step emitted, event) of every event of the default detectors, streaming the records."""
    diag = Diagnoser(default_detectors())
    out = []
    for step, values in records_of(h):
        out += [(step, e) for e in diag(step, values)]
    return out


def analyse(run: Run, h: History, meta: dict) -> dict:
    steps, loss = h["loss"]
    fail = failure_step(steps, loss, margin=MARGIN, smooth=SMOOTH, hold=HOLD)
    evs = emitted_events(h)
    severe = [(st, e) for st, e in evs if e.severity in SEVERE]
    first = severe[0] if severe else None
    lead = lead_time(fail, [st for st, _ in severe])
    lead_b = lead_time(fail, [st for st, _ in severe if st >= BURN_IN])
    n_steps = int(steps[-1]) + 1 if len(steps) else 0
    before = [(st, e) for st, e in severe if fail is None or st <= fail]
    return dict(run=run, failure=fail, lead=lead, lead_b=lead_b, n_steps=n_steps,
                n_severe_b=sum(st >= BURN_IN for st, _ in severe), status=meta["status"], cpu_s=meta["cpu_s"],
                first=None if first is None else (first[0], first[1].kind, first[1].severity),
                n_severe=len(severe), n_severe_before=len(before),
                kinds_before=Counter(e.kind for _, e in before),
                kinds_all=Counter(e.kind for _, e in severe),
                first_by_kind={k: min(st for st, e in severe if e.kind == k) for k in {e.kind for _, e in severe}},
                best_loss=float(np.nanmin(loss)) if np.isfinite(loss).any() else float("nan"),
                final_loss=float(np.nanmean(loss[-SMOOTH:])) if len(loss) else float("nan"))


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])


def _kinds(c: Counter) -> str:
    return ", ".join(f"{k} {n}" for k, n in c.most_common()) or "-"


def report(results: list[dict]) -> str:
    fails = [r for r in results if r["run"].role == "fail"]
    twins = [r for r in results if r["run"].role == "twin"]
    rows = []
    for r in fails:
        twin = next((t for t in twins if t["run"].pair == r["run"].name), None)
        first = r["first"]
        rows.append([
            r["run"].name, r["run"].note, r["status"],
            "-" if r["failure"] is None else str(r["failure"]),
            "-" if first is None else f"{first[0]} ({first[1]}, {first[2]})",
            "-" if r["lead"] is None else str(r["lead"]),
            "-" if r["lead_b"] is None else str(r["lead_b"]),
            _kinds(r["kinds_before"]) if r["failure"] is not None else "-",
            "-" if twin is None else ("FAILED at " + str(twin["failure"]) if twin["failure"] is not None else "stable")
            + f"; {twin['n_severe']} warnings ({per_1000(twin['n_severe'], twin['n_steps']):.2f} / 1000 steps)"
            + (f": {_kinds(twin['kinds_all'])}" if twin["n_severe"] else ""),
        ])
    out = ["#### Per run", "", md_table(
        ["run", "configuration", "status", "failure step", "first warning emitted (kind, severity)",
         "lead (steps)", f"lead from events at step >= {BURN_IN}", "warning/critical events up to the failure, by kind", "twin (qk-norm + z-loss, lr / 4): outcome; warning/critical events by kind"], rows), ""]
    failed = [r for r in fails if r["failure"] is not None]
    leads = [r["lead"] for r in failed if r["lead"] is not None]
    d = distribution(leads)
    leads_b = [r["lead_b"] for r in failed if r["lead_b"] is not None]
    tw_b = sum(t["n_severe_b"] for t in stable_twins) if (stable_twins := [t for t in twins if t["failure"] is None]) else 0
    tw_steps_b = sum(max(t["n_steps"] - BURN_IN, 0) for t in stable_twins)
    fsteps = distribution([r["failure"] for r in failed])
    stable_twins = [t for t in twins if t["failure"] is None]
    tw_events = sum(t["n_severe"] for t in stable_twins)
    tw_steps = sum(t["n_steps"] for t in stable_twins)
    rel = [r["lead"] / r["failure"] for r in failed if r["lead"] is not None and r["failure"]]
    dist_rows = [
        ["runs meant to fail / failed by the definition", f"{len(fails)} / {len(failed)}"],
        ["failure step: median [quartiles] (min-max)", _q(fsteps)],
        ["failed runs warned at or before the failure", f"{len(leads)} / {len(failed)}"],
        ["lead time, steps: median [quartiles] (min-max)", _q(d)],
        ["lead time as a fraction of the failure step: median (min-max)",
         "-" if not rel else f"{np.median(rel):.2f} ({min(rel):.2f}-{max(rel):.2f})"],
        [f"the same, counting only events at step >= {BURN_IN}: warned / lead",
         f"{len(leads_b)} / {len(failed)}; {_q(distribution(leads_b))}"],
        ["stable twins (did not fail) / twins", f"{len(stable_twins)} / {len(twins)}"],
        ["stable twins with any warning/critical event", f"{sum(t['n_severe'] > 0 for t in stable_twins)} / {len(stable_twins)}"],
        ["warning/critical events on stable twins per 1000 steps",
         f"{per_1000(tw_events, tw_steps):.2f} ({tw_events} in {tw_steps} steps)"],
        [f"the same, from step {BURN_IN} on", f"{per_1000(tw_b, tw_steps_b):.2f} ({tw_b} in {tw_steps_b} steps); "
         f"twins with any: {sum(t['n_severe_b'] > 0 for t in stable_twins)} / {len(stable_twins)}"],
    ]
    out += ["#### Distribution", "", md_table(["quantity", "value"], dist_rows), ""]
    # which kind gives the first warning, over failing runs; and how often each kind fires on twins
    first_kind = Counter(r["first"][1] for r in failed if r["lead"] is not None)
    twin_kind = Counter(k for t in stable_twins for k in t["first_by_kind"])
    fail_kind = Counter(k for r in failed for k, st in r["first_by_kind"].items() if st <= r["failure"])
    kinds = sorted(set(first_kind) | set(twin_kind) | set(fail_kind), key=lambda k: (-fail_kind[k], k))
    krows = []
    for k in kinds:
        ls = [r["failure"] - r["first_by_kind"][k] for r in failed if k in r["first_by_kind"] and r["first_by_kind"][k] <= r["failure"]]
        kd = distribution(ls)
        krows.append([k, f"{fail_kind[k]} / {len(failed)}", str(first_kind[k]), _q(kd) if ls else "-",
                      f"{twin_kind[k]} / {len(stable_twins)}"])
    out += ["#### By detector kind", "", md_table(
        ["kind", "failed runs it warned before the failure", "first warning on", "its lead, steps: median [quartiles] (min-max)",
         "stable twins it fired on"], krows), ""]
    return "\n".join(out)


def _q(d: dict) -> str:
    if not d["n"]:
        return "-"
    return f"{d['median']:g} [{d['q1']:g}-{d['q3']:g}] ({d['min']:g}-{d['max']:g}), n={d['n']}"


def machine() -> str:
    return f"{os.cpu_count()} CPUs (nproc), {cpu_model()}, torch {torch.__version__}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rebuild", action="store_true", help="retrain the runs instead of using the cache")
    ap.add_argument("--only", nargs="*", default=None, help="train/score only these runs (and their twins)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    load0, t0 = os.getloadavg(), time.time()
    runs = run_set()
    if args.only:
        runs = [r for r in runs if r.pair in args.only or r.name in args.only]
    results, cpu = [], 0.0
    for run in runs:
        h, meta = load_or_build(run, args.rebuild, log)
        cpu += meta["cpu_s"]
        results.append(analyse(run, h, meta))
    text = report(results)
    print(text)
    print(f"\n{len(runs)} runs; training CPU time (training thread, as recorded when built) {cpu / 60:.1f} min; "
          f"this invocation {time.time() - t0:.0f} s wall; load average at start {load0[0]:.1f}, at end {os.getloadavg()[0]:.1f}; "
          f"{machine()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
