"""Healthy-runs negative set: per-step losses of small GPT runs that do not diverge, and the
alarms seismo's loss detectors and the peer rules raise on them.

    nice python bench/healthy_runs.py --generate [--seeds 0 1 2] [--steps 3000]   # 40 s to 15 min per run on 2 shared cores
    python bench/healthy_runs.py [--boot 40] [--without-outlier-onset]

``--generate`` trains TinyGPT (the ``tiny`` preset: d=64, 2 layers, T=64, batch 8, AdamW, cosine
decay) on this machine's Python standard library (bytes as tokens) and writes each run's per-step
training loss to ``bench/healthy/seed<N>.csv``: one rank, batch 8, so the per-step loss is noisy
and heavy-tailed (some files of the corpus are much harder than others).

The evaluation (default) scores, on those logs and on synthetic series derived from them:

* **real**: the logs themselves (no spike is injected; every warning-or-critical episode is a
  false alarm);
* **bootstrap**: ``--boot`` series per run, the run's own smooth trend (a running median) plus
  its residuals resampled in blocks of 16 steps (the tail and the short-range correlation of the
  real noise, many more steps than the runs);
* **bootstrap + spikes**: the same with one-step spikes of +0.9 to +1.6 nats (the size of the
  large spikes in the issue's public logs) every ~2,000 steps, each decaying over a few steps.
  A spike's size is what the user sees, its **observed excess**: the loss at the spike step minus
  the median of its 32 neighbours (the 16 steps before it and the 16 from 6 steps after it, past
  the injected decay). An injection of +0.9 that lands on a negative residual stands less than
  0.9 above its neighbours; one of +0.8-equivalent that lands on a positive residual more. Every
  spike whose observed excess is >= 0.9 nats must be reported (any severity, within 2 steps of
  the injection), with its recovery time; the others are counted separately.

Alarm episodes: alarms less than 200 steps apart are one episode; rates per 100,000 steps, by
severity. Peers: OLMo-core's 6-sigma rule, llm-foundry's kill-loss-spike rule and Lightning's
SpikeDetection as in ``bench/_detection_peers.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _detection_peers import FoundryKillLossSpike, LightningSpikeDetection, OlmoSpikeRule  # noqa: E402
from _machine import cpu_model, loadavg  # noqa: E402

from seismo.diagnose import Diagnoser, default_detectors  # noqa: E402

OUT = Path(__file__).resolve().parent / "healthy"
MERGE = 200


def generate(seeds: list[int], steps: int) -> None:
    from seismo.proxy import train
    from seismo.proxy.presets import get_preset

    OUT.mkdir(exist_ok=True)
    for seed in seeds:
        cfg = get_preset("tiny")
        cfg.steps, cfg.seed, cfg.eval_every, cfg.checkpoint_every, cfg.monitor = steps, seed, 0, 0, "none"
        cfg.log_every, cfg.out_dir, cfg.store = 500, "", ""
        cfg.data.max_bytes = 4_000_000
        t, c = time.time(), time.thread_time()
        r = train(cfg)
        loss = np.asarray(r.train_loss, dtype=np.float64)
        path = OUT / f"seed{seed}.csv"
        np.savetxt(path, np.column_stack([np.arange(len(loss)), loss]), fmt=["%d", "%.6f"], delimiter=",", header="step,loss",
                   comments="")
        print(f"seed {seed}: {steps} steps in {time.time() - t:.0f} s wall, {time.thread_time() - c:.0f} s CPU of the training "
              f"thread (load average {loadavg()}), final loss {loss[-50:].mean():.3f} -> {path}", flush=True)


if __name__ == "__main__" and "--generate" in sys.argv:
    ap = argparse.ArgumentParser()
    ap.add_argument("--generate", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--steps", type=int, default=3000)
    a = ap.parse_args()
    generate(a.seeds, a.steps)
    sys.exit(0)


def load_runs() -> dict[str, np.ndarray]:
    runs = {}
    for path in sorted(OUT.glob("seed*.csv")):
        a = np.loadtxt(path, delimiter=",", skiprows=1)
        runs[path.stem] = a[:, 1]
    if not runs:
        raise SystemExit(f"no healthy-run logs in {OUT}: run with --generate first")
    return runs


def trend(x: np.ndarray, half: int = 25) -> np.ndarray:
    """Running median over 2 * half + 1 steps (edges: the nearest full window)."""
    w = np.lib.stride_tricks.sliding_window_view(x, 2 * half + 1)
    med = np.median(w, axis=1)
    return np.concatenate([np.full(half, med[0]), med, np.full(half, med[-1])])


def bootstrap(x: np.ndarray, rng: np.random.Generator, skip: int, block: int = 16) -> np.ndarray:
    """The run's trend plus its own residuals (after ``skip`` warm-up steps) resampled in blocks."""
    tr = trend(x)
    res = (x - tr)[skip:]
    n = len(x)
    starts = rng.integers(0, len(res) - block, size=n // block + 1)
    boot = np.concatenate([res[s: s + block] for s in starts])[:n]
    return tr + boot


def observed_excess(x: np.ndarray, s: int, span: int = 6, side: int = 16) -> float:
    """What a spike at ``s`` looks like to the user: x[s] minus the median of the ``side`` steps
    before it and the ``side`` steps from ``s + span`` on (the injected decay left out)."""
    return float(x[s] - np.median(np.r_[x[max(s - side, 0): s], x[s + span: s + span + side]]))


def inject(x: np.ndarray, rng: np.random.Generator, every: int = 2000, start: int = 600) -> tuple[np.ndarray, list[int]]:
    """One-step spikes of +0.9 to +1.6 nats every ~``every`` steps, decaying by half each step."""
    x = x.copy()
    at = list(range(start + int(rng.integers(0, every // 2)), len(x) - 50, every))
    for s in at:
        h = float(rng.uniform(0.9, 1.6))
        for k in range(6):
            x[s + k] += h * 0.5**k
    return x, at


def episodes(steps: list[int]) -> int:
    n, last = 0, None
    for s in sorted(steps):
        if last is None or s - last >= MERGE:
            n += 1
        last = s
    return n


OUTLIER_ONSET = True  # --without-outlier-onset: the loss-spike onset of before issue 18 (4.5 noise units and the ramp only)


def seismo_events(x: np.ndarray):
    dets = default_detectors()
    if not OUTLIER_ONSET:
        for d in dets:
            if d.name == "loss_spike":
                d.outlier_z = None
    det = Diagnoser(dets)
    return [e for e in det.replay({"loss": (np.arange(len(x)), x)})
            if e.kind in ("loss_spike", "loss_divergence", "loss_regression")]


def peer_alarms(rule_cls, x: np.ndarray, **kw) -> list[int]:
    rule = rule_cls(**kw)
    return [i for i, v in enumerate(x.tolist()) if rule.update(v)]


def score(series: list[tuple[str, np.ndarray, list[int]]], skip: int) -> dict:
    """Alarm episodes per 100,000 steps outside [spike - 20, spike + 50], after ``skip`` warm-up steps."""
    out: dict[str, list] = {k: [0, 0] for k in ("warning+", "info", "olmo_core", "llm_foundry", "lightning")}
    steps = 0
    found, recov = 0, []
    n_spikes, big, big_found, missed, margins = 0, 0, 0, [], []
    peer_found = {"olmo_core": 0, "llm_foundry": 0, "lightning": 0}
    for _, x, spikes in series:
        n = len(x)
        steps += n - skip

        def outside(s, spikes=spikes):
            return s >= skip and all(not (sp - 20 <= s <= sp + 50) for sp in spikes)

        ev = seismo_events(x)
        out["warning+"][0] += episodes([e.step for e in ev if e.severity != "info" and outside(e.step)])
        out["info"][0] += episodes([e.step for e in ev if e.severity == "info" and outside(e.step)])
        for sp in spikes:
            n_spikes += 1
            hit = [e for e in ev if e.kind == "loss_spike" and sp - 2 <= e.step <= sp + 2]
            size = observed_excess(x, sp)
            big += size >= 0.9
            if hit:
                found += 1
                big_found += size >= 0.9
                if size >= 0.9:
                    recov.append(hit[0].evidence.get("steps_to_recover"))
                    margins.append((hit[0].evidence["zscore"], hit[0].evidence["peak_excess"]))
            else:
                missed.append(size)
        for name, alarms in (("olmo_core", peer_alarms(OlmoSpikeRule, x)),
                             ("llm_foundry", peer_alarms(FoundryKillLossSpike, x, total_steps=n)),
                             ("lightning", peer_alarms(LightningSpikeDetection, x))):
            out[name][0] += episodes([s for s in alarms if outside(s)])
            peer_found[name] += sum(any(sp - 2 <= s <= sp + 2 for s in alarms) for sp in spikes)
    rates = {k: (v[0], 1e5 * v[0] / max(steps, 1)) for k, v in out.items()}
    return dict(steps=steps, rates=rates, spikes=n_spikes, found=found, recovery=recov, peer_found=peer_found,
                big=big, big_found=big_found, missed=sorted(missed), margins=margins)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--boot", type=int, default=10, help="bootstrap series per run")
    ap.add_argument("--skip", type=int, default=300, help="warm-up steps left out of the rates")
    ap.add_argument("--without-outlier-onset", action="store_true",
                    help="for comparison: loss_spike without its material-outlier onset (outlier_z=None)")
    a = ap.parse_args()
    global OUTLIER_ONSET
    OUTLIER_ONSET = not a.without_outlier_onset
    runs = load_runs()
    rng = np.random.default_rng(0)
    sets = {
        "real": [(k, x, []) for k, x in runs.items()],
        "bootstrap": [(k, bootstrap(x, rng, a.skip), []) for k, x in runs.items() for _ in range(a.boot)],
    }
    spiked = []
    for k, x in runs.items():
        for _ in range(a.boot):
            y, at = inject(bootstrap(x, rng, a.skip), rng)
            spiked.append((k, y, at))
    sets["bootstrap + spikes"] = spiked
    print(f"runs: {', '.join(f'{k} ({len(x)} steps, final {x[-100:].mean():.2f})' for k, x in runs.items())}")
    print(f"machine: {cpu_model()}; load average at start {loadavg()}")
    print("| set | steps | seismo warning+ | seismo info | olmo_core | llm_foundry | lightning | spikes of >= 0.9 nats observed, reported |")
    print("|---|---|---|---|---|---|---|---|")
    notes = []
    for name, series in sets.items():
        t, c = time.time(), time.process_time()
        r = score(series, a.skip)
        cells = [f"{r['rates'][k][0]} ({r['rates'][k][1]:.1f})" for k in ("warning+", "info", "olmo_core", "llm_foundry", "lightning")]
        rec = [v for v in r["recovery"] if v is not None]
        sp = "-"
        if r["spikes"]:
            sp = (f"{r['big_found']}/{r['big']} (recovery median {np.median(rec):.0f} steps, max {max(rec)}; "
                  f"{sum(v is None for v in r['recovery'])} without); all injected: {r['found']}/{r['spikes']}; peers (all injected): "
                  + ", ".join(f"{k} {v}/{r['spikes']}" for k, v in r["peer_found"].items()))
            if r["margins"]:
                notes.append(f"{name}: at the reported spikes of >= 0.9 nats, the detector's own peak z-score >= "
                             f"{min(m[0] for m in r['margins']):.2f} noise units and peak excess >= "
                             f"{min(m[1] for m in r['margins']):.2f} nats over its level")
            if r["missed"]:
                notes.append(f"{name}: missed injections stood {', '.join(f'{v:+.2f}' for v in r['missed'])} nats above their neighbours")
        print(f"| {name} | {r['steps']:,} | " + " | ".join(cells) + f" | {sp} |  "
              f"<!-- {time.time() - t:.0f} s wall, {time.process_time() - c:.0f} s CPU, load {loadavg()} -->")
    print("cells: alarm episodes (per 100,000 steps); alarms < 200 steps apart are one episode; windows [-20, +50] of injected "
          "spikes excluded; observed excess = the loss at the spike minus the median of its 16 steps before and 16 from 6 after")
    for n in notes:
        print(n)


if __name__ == "__main__":
    main()
