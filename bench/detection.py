"""Detection benchmark: seismo's detectors against the spike rules in use today.

    python bench/detection.py [--quick] [--rebuild] [--no-real] [--tune] [--write-docs] [--render]

Two labelled halves:

* **generated** series with known ground truth (``bench/_detection_series.py``): loss curves and
  grad-norm-like series with injected spikes, slow drifts, plateaus and clean negatives, under
  Gaussian, heteroscedastic and Student-t noise. A *test* split (seed 3) is scored; a separate
  *tuning* split (seed 2) is the only data ``--tune`` looks at. Seed 1 was the test split until
  December 2026; it was looked at while the current defaults were developed (the persistent-level
  fix came after seeing its failures), so it was retired and seed 3 drawn fresh.
* **real** runs (``bench/_detection_runs.py``) of TinyGPT and small MLPs that reproduce one
  instability kind each, plus their stabilised twins, cached under ``bench/.cache/detection/``.

seismo's ``loss_spike`` / ``grad_spike`` (``default_detectors()``) and three peer rules
re-implemented from PEERS.md (``bench/_detection_peers.py``) are scored with one matching rule
(``bench/_detection_score.py``): an alarm in ``[onset, onset + 10]`` hits the episode; alarms
elsewhere are false positives, one per alarm episode. ``--write-docs`` replaces the "Detection"
section of docs/BENCHMARKS.md with the tables printed here.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _detection_peers import PEER_RULES  # noqa: E402
from _detection_runs import (  # noqa: E402
    CACHE,
    Case,
    History,
    degradation_onset,
    eos_mlp,
    first_at_or_above,
    first_nonfinite_loss,
    load_or_build,
    loss_jump_after,
    modular_mlp,
    proxy_run,
    sharpness_crossing,
    tiny_loop,
    visible,
)
from _detection_score import TOL, Score, combine, match  # noqa: E402
from _detection_series import Series, make_set  # noqa: E402
from _machine import cpu_model  # noqa: E402

from seismo.diagnose.detectors import GrowthDetector, SpikeDetector, default_detectors  # noqa: E402
from seismo.diagnose.engine import diagnose_history  # noqa: E402
from seismo.diagnose.stats import RobustWindow  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "BENCHMARKS.md"
TEST_SEED, TUNE_SEED = 3, 2
RETIRED_TEST_SEEDS = (1,)  # seen while the current defaults were developed
SPIKE_KIND = {"loss": "loss_spike", "grad/norm": "grad_spike"}
PEERS = ("olmo_core", "llm_foundry", "lightning")
BURN_IN = 100  # real runs: spike alarms before this step are not scored (early-training transients; no peer rule is active yet)


# --- seismo on one series ----------------------------------------------------------------------

#: What ``--tune`` found on the tuning split (seed 2, 200 loss + 100 grad-norm series). A run with
#: ``--tune`` replaces these with what it finds before the test split is scored; without it they
#: come from the last tuning run cached in ``bench/.cache/detection/tune.json``, else these (found
#: in November 2026 for the defaults of then). Scored on the test split as a separate row; the
#: library defaults are not changed from them.
TUNED = {"loss": dict(z=10.0, rel=0.02), "grad/norm": dict(z=8.0, rel=1.0)}
SEVERE = ("warning", "critical")


def seismo_detector(signal: str, **overrides) -> SpikeDetector:
    """A fresh copy of the default ``loss_spike`` / ``grad_spike`` detector, with optional
    overrides of ``z``, ``rel``, ``window``, ``min_history`` (for tuning)."""
    kind = SPIKE_KIND[signal]
    det = next(d for d in default_detectors() if d.name == kind)
    for k, v in overrides.items():
        if k == "window":
            det.window = RobustWindow(int(v))
        else:
            setattr(det, k, v)
    return det


def seismo_events(series: Series, **overrides) -> list[tuple[int, str]]:
    """(step, severity) of every ``loss_spike`` / ``grad_spike`` event on the series. The step is
    the episode's onset; with triage (the loss) the event is emitted later (at the recovery for an
    ``info`` outlier, ``quick`` = 5 observations after the onset for a ``warning``)."""
    det = seismo_detector(series.signal, **overrides)
    kind = SPIKE_KIND[series.signal]
    out = []
    for i, v in enumerate(series.values.tolist()):
        out += [(e.step, e.severity) for e in det.update(i, {series.signal: v}) if e.kind == kind]
    return out


def seismo_alarms(series: Series, **overrides) -> list[int]:
    return [st for st, _ in seismo_events(series, **overrides)]


def peer_alarms(series: Series) -> dict[str, list[int]]:
    out = {}
    for rule in PEER_RULES(series.signal, len(series.values)):
        out[rule.name] = [i for i, v in enumerate(series.values.tolist()) if rule.update(v)]
    return out


def height_bin(h: float) -> str:
    return "3-6" if h < 6 else "6-12" if h < 12 else "12-30" if h < 30 else ">=30"


def _fmt_params(p: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in p.items())


def detector_rows(series: Series, variants: bool) -> dict[str, list[int]]:
    """Alarm steps of every scored detector on one series."""
    ev = seismo_events(series)
    alarms = {"seismo": [st for st, _ in ev]}
    if series.signal == "loss":  # triage: isolated outliers are `info`; the rest warn
        alarms["seismo warning+"] = [st for st, sev in ev if sev in SEVERE]
    if variants:
        alarms[f"seismo tuned ({_fmt_params(TUNED[series.signal])})"] = seismo_alarms(series, **TUNED[series.signal])
    alarms.update(peer_alarms(series))
    return alarms


def score_set(series: list[Series], variants: bool = True) -> dict:
    """Scores per (detector, signal) and per (detector, signal, noise); strata: recall by height
    bin / duration / recovery / noise, and false-alarm episodes by series family / noise."""
    total: dict[tuple[str, str], list[Score]] = defaultdict(list)
    by_noise: dict[tuple[str, str, str], list[Score]] = defaultdict(list)
    strata: dict[tuple[str, str, str, str], list[int]] = defaultdict(lambda: [0, 0])  # hits, episodes
    fams: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])  # FP episodes, series
    order: list[str] = []
    for s in series:
        noise = s.name.split("/")[2]  # gauss, hetero, student_t3, student_t5
        for name, a in detector_rows(s, variants).items():
            if name not in order:
                order.append(name)
            sc = match(a, s.episodes)
            total[(name, s.signal)].append(sc)
            by_noise[(name, s.signal, noise)].append(sc)
            for key in (s.family, "noise:" + noise):
                fams[(name, s.signal, key)][0] += sc.fp
                fams[(name, s.signal, key)][1] += 1
            for ep in s.episodes:
                hit = any(ep.onset <= x <= ep.onset + TOL for x in a)
                for stratum, value in (("height", height_bin(ep.height_sigma)), ("recovery", ep.recovery),
                                       ("duration", "1" if ep.duration == 1 else "2-5" if ep.duration <= 5 else "6-30")):
                    strata[(name, s.signal, stratum, value)][0] += hit
                    strata[(name, s.signal, stratum, value)][1] += 1
    order.sort(key=lambda n: (n in PEERS, PEERS.index(n) if n in PEERS else 0))  # seismo rows first, then the peers
    return {"total": {k: combine(v) for k, v in total.items()}, "noise": {k: combine(v) for k, v in by_noise.items()},
            "strata": dict(strata), "families": dict(fams), "order": order}


# --- tuning (tuning split only) -----------------------------------------------------------------

def tune(n_loss: int, n_grad: int, log=print) -> dict:
    """Coarse grid over SpikeDetector's z / rel / window / min_history on the tuning split; the
    best F1 per signal (ties: lower median latency, then fewer alarms)."""
    tune_set = make_set(TUNE_SEED, n_loss, n_grad)
    results = {}
    for signal in ("loss", "grad/norm"):
        subset = [s for s in tune_set if s.signal == signal]
        base = seismo_detector(signal)
        zs = sorted({4.5, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, base.z})  # the default's z is always in the grid
        rels = sorted({*((0.02, 0.05, 0.1, 0.2) if signal == "loss" else (0.5, 1.0, 2.0)), base.rel})
        grid = [dict(z=z, rel=r) for z in zs for r in rels]
        rows = []

        def evaluate(params, subset=subset, rows=rows, signal=signal):
            t0 = time.time()
            sc = combine(match(seismo_alarms(s, **params), s.episodes) for s in subset)
            rows.append(dict(params=params, f1=sc.f1, precision=sc.precision, recall=sc.recall,
                             latency=sc.median_latency, fp=sc.fp))
            log(f"  tune {signal} {params}: F1 {sc.f1:.3f} P {sc.precision:.3f} R {sc.recall:.3f} ({time.time() - t0:.0f} s)")
            return sc

        for p in grid:
            evaluate(p)
        best = max(rows, key=lambda r: (round(r["f1"], 3), -r["latency"]))
        for w in (64, 256):
            evaluate({**best["params"], "window": w})
        for mh in (10, 64):
            evaluate({**best["params"], "min_history": mh})
        best = max(rows, key=lambda r: (round(r["f1"], 3), -r["latency"]))
        results[signal] = dict(default=dict(z=base.z, rel=base.rel, window=base.window.size, min_history=base.min_history),
                               best=best, rows=rows, n_series=len(subset))
    return results


# --- real runs ----------------------------------------------------------------------------------

def real_cases(quick: bool) -> list[Case]:
    demo_steps = 150 if quick else 300
    tiny_steps = 300 if quick else 500
    spike_steps = 600 if quick else 1200
    burst_at = list(range(200, spike_steps - 50, 150))  # 200, 350, ...: every 150 steps after the burn-in
    lr_factors = (10.0, 30.0, 100.0)
    grad_targets = (("transformer.h.1.mlp.c_fc", 100.0), ("lm_head", 10.0), ("transformer.h.0.attn.c_attn", 1000.0))
    seeds = (0,) if quick else (0, 1)
    cases = [
        Case("demo_unstable", lambda: proxy_run("demo_unstable", demo_steps), dict(steps=demo_steps),
             expect=("attention_logit_growth",), failure=lambda h: first_at_or_above(h, "attn/logit_max/", 1e3),
             failure_what="max attention logit >= 1e3",
             note="demo preset (d=128, 2 layers, T=128, B=32), lr 0.1"),
        Case("demo_qknorm_zloss", lambda: proxy_run("demo_stable", demo_steps), dict(steps=demo_steps),
             forbid=("attention_logit_growth", "loss_spike", "grad_spike"), note="demo_stable: lr 0.1 + qk-norm + z-loss 1e-4"),
        Case("tiny_clean", lambda: tiny_loop(tiny_steps), dict(steps=tiny_steps, v=2),
             forbid=("loss_spike", "epsilon_regime", "stall", "nonfinite"), note="tiny TinyGPT, lr 1e-2, eps 1e-8"),
    ]
    for seed in seeds:
        lr_b = {k: lr_factors[i % 3] for i, k in enumerate(burst_at)}
        gr_b = {k: grad_targets[i % 3] for i, k in enumerate(burst_at)}
        cases += [
            Case(f"tiny_lr_bursts_s{seed}", lambda lr_b=lr_b, seed=seed: tiny_loop(spike_steps, lr_bursts=lr_b, seed=seed, probes="minimal"),
                 dict(steps=spike_steps, bursts=lr_b, seed=seed, v=3), onsets={"loss_spike": [k + 1 for k in burst_at]}, check_visible=True,
                 note=f"tiny, data seed {seed}, lr x10/x30/x100 for one step at {burst_at}"),
            Case(f"tiny_grad_bursts_s{seed}", lambda gr_b=gr_b, seed=seed: tiny_loop(spike_steps, grad_bursts=gr_b, seed=seed, probes="minimal"),
                 dict(steps=spike_steps, bursts={k: list(v) for k, v in gr_b.items()}, seed=seed, v=3),
                 onsets={"grad_spike": list(burst_at)}, modules={k: m for k, (m, _) in gr_b.items()},
                 note=f"tiny, data seed {seed}, one module's gradient x100 (h.1.mlp.c_fc) / x10 (lm_head) / x1000 (h.0.attn.c_attn) at {burst_at}"),
        ]
    cases += [
        Case("tiny_eps_0.1", lambda: tiny_loop(tiny_steps, eps=1e-1), dict(steps=tiny_steps, v=2),
             expect=("epsilon_regime",), forbid=("stall",), note="tiny, AdamW eps 0.1 (the loss still falls like tiny_clean's)"),
        Case("tiny_eps_100", lambda: tiny_loop(tiny_steps, eps=100.0), dict(steps=tiny_steps, v=2),
             expect=("epsilon_regime", "stall"), note="tiny, AdamW eps 100 (updates ~1e-6 of the weights)"),
        Case("tiny_nan", lambda: tiny_loop(120, nan_at=100), dict(steps=120, v=2), expect=("nonfinite",),
             failure=first_nonfinite_loss, failure_what="first non-finite loss", note="tiny, a NaN written into a weight at step 100"),
        Case("eos_gd_lr0.05", lambda: eos_mlp(0.05, 800 if quick else 1500), dict(steps=800 if quick else 1500),
             expect=("edge_of_stability",), failure=sharpness_crossing, failure_what="sharpness >= 2/lr",
             note="MLP 16-64-64-1 tanh, full-batch GD lr 0.05 (2/lr = 40)"),
        Case("eos_gd_lr0.02", lambda: eos_mlp(0.02, 800 if quick else 1500), dict(steps=800 if quick else 1500),
             forbid=("edge_of_stability",), note="same MLP, lr 0.02 (2/lr = 100)"),
        Case("modular_mlp_wd0", lambda: modular_mlp(1000 if quick else 1300), dict(steps=1000 if quick else 1300),
             expect=("softmax_collapse",), failure=lambda h: loss_jump_after(h, 200),
             failure_what="loss jumps 100x above its running minimum",
             note="MLP 226-200-200-113 on (a+b) mod 113, full batch, AdamW lr 1e-2, no weight decay"),
        Case("modular_mlp_wd1", lambda: modular_mlp(1000 if quick else 1300, weight_decay=1.0), dict(steps=1000 if quick else 1300),
             forbid=("softmax_collapse",), note="same, weight decay 1.0"),
    ]
    if not quick:
        logz = dict(steps=3000, monitor_every=10, **{"optim.lr": 0.3, "optim.decay": "constant", "model.qk_norm": True})
        cases += [
            Case("tiny_lr0.3_nowd", lambda: proxy_run("tiny", **logz), dict(logz),
                 expect=("output_logit_divergence",), failure=lambda h: first_at_or_above(h, "logits/logz_absmax", 50.0),
                 failure_what="max |log Z| >= 50", note="tiny, qk-norm, constant lr 0.3, no weight decay, no z-loss, 3000 steps"),
            Case("tiny_lr0.3_wd0.1", lambda: proxy_run("tiny", **logz, **{"optim.weight_decay": 0.1}), dict(logz, wd=0.1),
                 forbid=("output_logit_divergence",), note="same, weight decay 0.1"),
            Case("tiny_lr0.3_zloss1e-3", lambda: proxy_run("tiny", **logz, z_loss=1e-3), dict(logz, z_loss=1e-3),
                 forbid=("output_logit_divergence",), note="same, z-loss 1e-3"),
        ]
    return cases


def score_real(cases: list[Case], hists: dict[str, History]) -> dict:
    """Per run: every event kind that fired (first warning / critical step); per kind: run-level
    precision/recall over expect/forbid labels; spike kinds also episode-matched (with peers)."""
    runs = []
    kinds: dict[str, Score] = defaultdict(Score)
    spike_scores: dict[tuple[str, str], Score] = defaultdict(Score)
    naming: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # injected module -> [named right, detected]
    invisible: dict[str, int] = defaultdict(int)  # injections the hand-check rule found invisible
    for case in cases:
        h = hists[case.name]
        diag = diagnose_history(h, run=case.name)
        first: dict[str, dict[str, int]] = defaultdict(dict)
        modules: dict[str, set] = defaultdict(set)
        for e in diag.events:
            first[e.kind].setdefault(e.severity, e.step)
            if e.module:
                modules[e.kind].add(e.module)
        failure = case.failure(h) if case.failure else None
        runs.append(dict(case=case, first=dict(first), modules={k: sorted(v) for k, v in modules.items()},
                         failure=failure, events=diag.events))
        for kind in case.expect:
            sc = kinds[kind]
            fired = kind in first
            sc.tp += fired
            sc.fn += not fired
            if fired and failure is not None:
                sc.latencies.append(min(first[kind].values()) - failure)
        for kind in case.forbid:
            if kind not in SPIKE_KIND.values():  # spike kinds are scored per episode below
                kinds[kind].fp += kind in first
        # spike kinds, episode-matched, seismo and peers on the same recorded signals
        for kind, signal in (("loss_spike", "loss"), ("grad_spike", "grad/norm")):
            if signal not in h or (kind not in case.onsets and kind not in case.forbid):
                continue
            onsets = case.onsets.get(kind, [])
            shown = [o for o in onsets if not case.check_visible or visible(h, signal, o)]
            eps = [_Ep(o) for o in shown]
            hidden = [_Ep(o) for o in onsets if o not in shown]
            invisible[kind] += len(hidden)
            s_events = [e for e in diag.events if e.kind == kind and e.step >= BURN_IN]
            s_alarms = [e.step for e in s_events]
            for onset, module in case.modules.items():
                hit = [e for e in s_events if onset <= e.step <= onset + TOL]
                if hit:
                    naming[module][0] += hit[0].module == module
                    naming[module][1] += 1
            spike_scores[("seismo", kind)] += match(s_alarms, eps, ignore=hidden)
            steps, vals = h[signal]
            tuned = seismo_detector(signal, **TUNED[signal])
            t_alarms = [e.step for st, v in zip(steps.tolist(), vals.tolist())
                        for e in tuned.update(int(st), {signal: v}) if e.kind == kind and st >= BURN_IN]
            spike_scores[(f"seismo tuned ({_fmt_params(TUNED[signal])})", kind)] += match(t_alarms, eps, ignore=hidden)
            for rule in PEER_RULES(signal, len(vals)):
                a = [int(st) for st, v in zip(steps.tolist(), vals.tolist()) if rule.update(v) and st >= BURN_IN]
                spike_scores[(rule.name, kind)] += match(a, eps, ignore=hidden)
    return dict(runs=runs, kinds=dict(kinds), spikes=dict(spike_scores), naming=dict(naming), invisible=dict(invisible))


class _Ep:
    def __init__(self, onset: int, length: int = 30):
        self.onset, self.end = onset, onset + length


# --- reporting ----------------------------------------------------------------------------------

def _f(x: float, nd: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _lat(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:g}"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def synthetic_tables(res: dict, n_neg: dict[str, int]) -> list[tuple[str, list[str], list[list[str]]]]:
    tables = []
    rows = []
    order = res["order"]
    for signal, label in (("loss", "loss_spike"), ("grad/norm", "grad_spike")):
        for name in order:
            sc = res["total"].get((name, signal))
            if sc is None:
                continue
            fp_neg = sum(v[0] for k, v in res["families"].items()
                         if k[0] == name and k[1] == signal and not k[2].startswith("noise:") and k[2] != "spikes")
            eps_n = sc.tp + sc.fn
            rows.append([label, name, _f(sc.precision), _f(sc.recall), _f(sc.f1), _lat(sc.median_latency),
                         str(sc.tp), str(sc.fn), str(sc.fp), f"{fp_neg} / {n_neg[signal]}", _f(sc.alarms / max(eps_n, 1), 1)])
    tables.append(("Generated test split: spike detection",
                   ["kind", "detector", "precision", "recall", "F1", "median latency (steps)", "TP", "FN", "FP",
                    "FP episodes on negative series / series", "alarm steps per labelled episode"], rows))
    rows = []
    noises = sorted({k[2] for k in res["noise"]})
    for signal, label in (("loss", "loss_spike"), ("grad/norm", "grad_spike")):
        for name in order:
            if (name, signal) not in res["total"]:
                continue
            cells = []
            for nz in noises:
                sc = res["noise"].get((name, signal, nz))
                cells.append("" if sc is None else f"{_f(sc.f1, 2)} ({_f(sc.precision, 2)} / {_f(sc.recall, 2)})")
            rows.append([label, name] + cells)
    tables.append(("F1 (precision / recall) by noise variant, generated test split",
                   ["kind", "detector"] + [n.replace("student_t", "Student-t df ") for n in noises], rows))
    cols = [n for n in order if n == "seismo" or n in PEERS]
    rows = []
    keys = ["3-6", "6-12", "12-30", ">=30", "1", "2-5", "6-30", "fast", "slow", "partial"]
    for signal, label in (("loss", "loss_spike"), ("grad/norm", "grad_spike")):
        for stratum in ("height", "duration", "recovery"):
            values = sorted({k[3] for k in res["strata"] if k[1] == signal and k[2] == stratum}, key=keys.index)
            for v in values:
                cells = []
                for name in cols:
                    st = res["strata"].get((name, signal, stratum, v))
                    cells.append("" if st is None else f"{st[0] / st[1]:.2f}")
                n = res["strata"][("seismo", signal, stratum, v)][1]
                rows.append([label, f"{stratum} {v}" + (" sigma" if stratum == "height" else ""), str(n)] + cells)
    tables.append(("Recall by stratum, generated test split", ["kind", "stratum", "episodes"] + cols, rows))
    rows = []
    for signal, label in (("loss", "loss_spike"), ("grad/norm", "grad_spike")):
        fams = sorted({k[2] for k in res["families"] if k[1] == signal}, key=lambda f: (f.startswith("noise:"), f))
        for fam in fams:
            cells = []
            for name in cols:
                v = res["families"].get((name, signal, fam))
                cells.append("" if v is None else str(v[0]))
            n = res["families"][("seismo", signal, fam)][1]
            rows.append([label, fam, str(n)] + cells)
    tables.append(("False-alarm episodes by series family and by noise, generated test split",
                   ["kind", "family", "series"] + cols, rows))
    return tables


def real_tables(real: dict, demo: dict | None) -> list[tuple[str, list[str], list[list[str]]]]:
    tables = []
    rows = []
    for r in real["runs"]:
        c = r["case"]
        fired = []
        for kind, sev in sorted(r["first"].items(), key=lambda kv: min(kv[1].values())):
            parts = "/".join(f"{s[0]}@{st}" for s, st in sorted(sev.items(), key=lambda kv: kv[1]))
            if kind == "grad_spike":  # which module each grad spike was pinned on
                named = [f"{e.step}: {e.module}" for e in r["events"]  # the final event of each episode, not its provisional onset
                         if e.kind == kind and not e.evidence.get("provisional")]
                parts += "; " + ", ".join(named[:8]) + (f", +{len(named) - 8} more" if len(named) > 8 else "")
            fired.append(f"{kind} ({parts})")
        label = "; ".join([f"+{k}" for k in c.expect] + [f"+{k} at {v}" for k, v in c.onsets.items()]
                          + ([f"-{','.join(c.forbid)}"] if c.forbid else []))
        rows.append([c.name, c.note, label, "; ".join(fired) or "none",
                     "-" if r["failure"] is None else f"{r['failure']} ({c.failure_what})"])
    tables.append(("Real runs: what fired (w = warning, c = critical, at step)",
                   ["run", "configuration", "label (+ must fire / - must not)", "events (first step per severity)", "failure step"], rows))
    rows = []
    for kind, sc in sorted(real["kinds"].items()):
        pos = [r for r in real["runs"] if kind in r["case"].expect]
        leads = []
        for r in pos:
            f = r["first"].get(kind, {})
            if r["failure"] is not None and "warning" in f:
                leads.append(r["failure"] - f["warning"])
        rows.append([kind, str(sc.tp + sc.fn), str(sum(kind in r["case"].forbid for r in real["runs"])),
                     _f(sc.precision, 2), _f(sc.recall, 2), _f(sc.f1, 2),
                     _lat(sc.median_latency) if sc.latencies else "-",
                     ", ".join(str(x) for x in leads) or "-"])
    tables.append(("Real runs: per kind (run level)",
                   ["kind", "positive runs", "negative runs", "precision", "recall", "F1",
                    "median (first event - failure step)", "warning lead before failure (steps)"], rows))
    rows = []
    for (name, kind), sc in sorted(real["spikes"].items(), key=lambda kv: (kv[0][1], kv[0][0] in PEERS, kv[0][0])):
        rows.append([kind, name, _f(sc.precision, 2), _f(sc.recall, 2), _f(sc.f1, 2), _lat(sc.median_latency),
                     str(sc.tp), str(sc.fn), str(sc.fp)])
    hid = ", ".join(f"{k}: {v}" for k, v in sorted(real["invisible"].items()) if v) or "none"
    tables.append((f"Real runs: spike episodes (injected onsets that visibly moved the signal; injections that did not, left out: {hid}; "
                   f"negatives = runs labelled '-'; alarms before step {BURN_IN} not scored)",
                   ["kind", "detector", "precision", "recall", "F1", "median latency", "TP", "FN", "FP"], rows))
    if real["naming"]:
        tables.append(("Real runs: module named by seismo's grad_spike at the injected spikes it detected",
                       ["injected module", "named right / detected"],
                       [[m, f"{v[0]} / {v[1]}"] for m, v in sorted(real["naming"].items())]))
    if demo:
        tables.append(("Demo: early warning of attention-logit growth (demo_unstable vs demo_qknorm_zloss)",
                       ["quantity", "step"], [[k, "-" if v is None else str(v)] for k, v in demo.items()]))
    return tables


def demo_lead(real: dict, hists: dict[str, History]) -> dict | None:
    if "demo_unstable" not in hists or "demo_qknorm_zloss" not in hists:
        return None
    r = next(r for r in real["runs"] if r["case"].name == "demo_unstable")
    f = r["first"].get("attention_logit_growth", {})
    onset = degradation_onset(hists["demo_unstable"], hists["demo_qknorm_zloss"])
    warn, crit = f.get("warning"), f.get("critical")
    out = {
        "first attention_logit_growth warning": warn,
        "threshold crossing (first critical, max logit >= 1e3)": crit,
        "loss-degradation onset (20-step mean >= 5% above the qk-norm run from here on)": onset,
        "lead: warning before threshold crossing": None if warn is None or crit is None else crit - warn,
        "lead: warning before loss-degradation onset": None if warn is None or onset is None else onset - warn,
    }
    # what-if (defaults unchanged): the warning needs |logit| >= floor x 1e3 before it may fire
    for floor in (0.05, 0.01):
        evs = {}
        for name in ("demo_unstable", "demo_qknorm_zloss"):
            det = GrowthDetector("attention_logit_growth", "attn/logit_max/", 1e3, floor=floor)
            d = diagnose_history({k: v for k, v in hists[name].items() if k.startswith("attn/logit_max/")}, detectors=[det])
            evs[name] = [e for e in d.events if e.severity == "warning"]
        w = evs["demo_unstable"][0].step if evs["demo_unstable"] else None
        out[f"what-if floor {floor} (default 0.25): first warning / lead before degradation / warnings on the qk-norm run"] = (
            f"{w} / {None if w is None or onset is None else onset - w} / {len(evs['demo_qknorm_zloss'])}")
    return out


def tuning_tables(tuned: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The tuning grid as z x rel matrices of F1 (tuning split), plus the window / min_history probes."""
    tables = []
    for signal, t in tuned.items():
        rows_in = t["rows"]
        zs = sorted({r["params"]["z"] for r in rows_in if len(r["params"]) == 2})
        rels = sorted({r["params"]["rel"] for r in rows_in if len(r["params"]) == 2})
        grid = {(r["params"]["z"], r["params"]["rel"]): r for r in rows_in if len(r["params"]) == 2}
        rows = [[f"z={z:g}"] + [f"{grid[(z, rel)]['f1']:.3f} ({grid[(z, rel)]['precision']:.2f} / {grid[(z, rel)]['recall']:.2f})"
                               for rel in rels] for z in zs]
        extra = [r for r in rows_in if len(r["params"]) > 2]
        rows += [[_fmt_params(r["params"]), f"{r['f1']:.3f} ({r['precision']:.2f} / {r['recall']:.2f})"] + [""] * (len(rels) - 1)
                 for r in extra]
        d = t["default"]
        tables.append((f"Tuning split (seed {TUNE_SEED}, {t['n_series']} series), {SPIKE_KIND[signal]}: F1 (precision / recall); "
                       f"defaults z={d['z']:g}, rel={d['rel']:g}, window={d['window']}, min_history={d['min_history']}",
                       ["setting"] + [f"rel={r:g}" for r in rels], rows))
    return tables


def print_tables(tables) -> None:
    try:
        from rich.console import Console
        from rich.table import Table

        console = Console(width=200)
        for title, header, rows in tables:
            t = Table(title=title, show_lines=False)
            for h in header:
                t.add_column(h, overflow="fold")
            for r in rows:
                t.add_row(*r)
            console.print(t)
    except ImportError:  # pragma: no cover
        for title, header, rows in tables:
            print(f"\n{title}\n{md_table(header, rows)}")


def machine() -> str:
    return f"{os.cpu_count()} CPUs (nproc), {cpu_model()}, torch {torch.__version__}, Python {platform.python_version()}"


def write_docs(text: str) -> None:
    begin, end = "<!-- detection:begin -->", "<!-- detection:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if begin in old and end in old:
        rest = old[old.index(end) + len(end):].lstrip("\n")
        new = old[: old.index(begin)] + block + ("\n" + rest if rest else "")
    else:
        new = old.rstrip("\n") + "\n\n" + block
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(new)


# --- main ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a reduced set: 120 + 60 generated series, shorter real runs")
    ap.add_argument("--rebuild", action="store_true", help="retrain the real runs instead of using the cache")
    ap.add_argument("--no-real", action="store_true", help="generated series only")
    ap.add_argument("--tune", action="store_true", help="grid-search SpikeDetector settings on the tuning split")
    ap.add_argument("--write-docs", action="store_true", help="replace the Detection section of docs/BENCHMARKS.md")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite the Detection section from the last full run's saved tables (bench/.cache/detection/results.json)")
    args = ap.parse_args(argv)
    if args.render:
        saved = json.loads((CACHE / "results.json").read_text())
        write_docs(render_doc([tuple(t) for t in saved["tables"]], saved["meta"]))
        print(f"wrote the Detection section of {DOC} from {CACHE / 'results.json'}")
        return 0
    torch.set_num_threads(1)
    t_start = time.time()
    load0 = os.getloadavg()
    n_loss, n_grad = (120, 60) if args.quick else (400, 200)

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    tuned = None
    if args.tune:
        log(f"tuning on split seed {TUNE_SEED} ({n_loss // 2} loss + {n_grad // 2} grad series)")
        tuned = tune(n_loss // 2, n_grad // 2, log)
        CACHE.mkdir(parents=True, exist_ok=True)
        (CACHE / "tune.json").write_text(json.dumps(tuned, indent=1, default=str))
    elif (CACHE / "tune.json").exists():
        tuned = json.loads((CACHE / "tune.json").read_text())
    if tuned:
        for sig, t in tuned.items():
            TUNED[sig] = dict(t["best"]["params"])
        log(f"tuned settings scored on the test split: {TUNED}")

    log(f"generated test split: seed {TEST_SEED}, {n_loss} loss + {n_grad} grad-norm series")
    test = make_set(TEST_SEED, n_loss, n_grad)
    t0 = time.time()
    res = score_set(test)
    t_synth = time.time() - t0
    n_neg = {sig: sum(1 for s in test if s.signal == sig and s.family != "spikes") for sig in ("loss", "grad/norm")}
    tables = synthetic_tables(res, n_neg)

    real = demo = None
    if not args.no_real:
        cases = real_cases(args.quick)
        hists = {}
        for c in cases:
            hists[c.name], _ = load_or_build(c, args.rebuild, log)
        real = score_real(cases, hists)
        demo = demo_lead(real, hists)
        tables += real_tables(real, demo)
    if tuned:
        tables += tuning_tables(tuned)
    print_tables(tables)
    if tuned:
        for sig, t in tuned.items():
            print(f"tuning split, {SPIKE_KIND[sig]}: defaults {t['default']}; best {t['best']['params']} "
                  f"F1 {t['best']['f1']:.3f} (P {t['best']['precision']:.3f}, R {t['best']['recall']:.3f})")
    elapsed = time.time() - t_start
    print(f"\nscored {len(test)} generated series in {t_synth:.0f} s; total {elapsed:.0f} s")
    cmd = ".venv/bin/python bench/detection.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = dict(cmd=cmd.strip(), machine=machine(), date=_dt.date.today().isoformat(), elapsed_s=round(elapsed),
                cpu_s=round(time.process_time()), load_start=load0, load_end=os.getloadavg(),
                n_loss=sum(s.signal == "loss" for s in test), n_grad=sum(s.signal != "loss" for s in test),
                test_seed=TEST_SEED, tune_seed=TUNE_SEED, tuned=TUNED, quick=args.quick)
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / ("results_quick.json" if args.quick else "results.json")).write_text(
        json.dumps(dict(meta=meta, tables=tables), indent=1, default=str))

    if args.write_docs:
        write_docs(render_doc(tables, meta))
        log(f"wrote the Detection section of {DOC}")
    return 0


def render_doc(tables, meta: dict) -> str:
    """The Detection section: a header naming the command, then the prose of
    bench/_detection_doc.md filled from the tables (bench/_detection_prose.py), then the tables."""
    from _detection_prose import render_prose

    prose = render_prose(tables)
    load = f"load average {meta['load_start'][0]:.1f} at the start, {meta['load_end'][0]:.1f} at the end" if "load_start" in meta else ""
    head = [
        "## Detection",
        "",
        f"`{meta['cmd']}` on {meta['machine']}, {meta['date']} (one torch thread; "
        f"{meta['n_loss']} loss + {meta['n_grad']} grad-norm generated series in the test split; "
        f"{meta['elapsed_s'] / 60:.0f} min wall, {meta['cpu_s'] / 60:.0f} min CPU; {load}; machine shared with other jobs).",
        "",
    ]
    body = [prose.rstrip(), ""] if prose else []
    for title, header, rows in tables:
        body += [f"#### {title}", "", md_table(header, rows), ""]
    return "\n".join(head + body)


if __name__ == "__main__":
    raise SystemExit(main())
