"""Real-data detection benchmark: seismo and three peer rules on the PolyPythia loss logs.

    python bench/pythia_detection.py [--data ../shared/data/pythia] [--write-docs]

The episodes were labelled by eye (``bench/labels/pythia.csv``, drawn with ``bench/pythia_plots.py``)
in five classes: ``spike`` (sharp, back within tens of steps), ``blip`` (one step), ``bump`` (a
climb of 0.05-0.4 nats that recovers over thousands of steps), ``level_shift`` and ``drift``;
``turbulent`` marks stretches where the level keeps switching (alarms there are neither required
nor false). Scoring, per detector:

- a spike or blip is *found* if an alarm comes within [onset - 20, onset + 50]; a bump, level shift
  or drift if one comes within [onset - 500, onset + 2,000]; lag = first such alarm - onset;
- a *false alarm* is an alarm episode (alarms less than 200 steps apart are one episode) outside
  every labelled window ([onset - 500, end + 2,000]) and outside the turbulent stretches; the rate
  is per 100,000 steps of the runs outside the turbulent stretches.

seismo's alarms are its events (``loss_spike``, ``loss_divergence``, ``loss_regression``) from
``Diagnoser().replay`` with the default detectors, at the step they are known (``detected_at``
for a regression, the onset for a spike, whose severity comes later); "seismo (warning+)" counts
only ``warning`` and ``critical`` events, "seismo (any)" counts ``info`` outliers too. The peer
rules (``bench/_detection_peers.py``) alarm on every step they flag. ``--write-docs`` replaces the
PolyPythia block of docs/BENCHMARKS.md with the table and the prose generated from it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _detection_peers import FoundryKillLossSpike, LightningSpikeDetection, OlmoSpikeRule  # noqa: E402
from _machine import cpu_model  # noqa: E402
from pythia_data import DEFAULT_DATA, Label, load_labels, load_loss, runs  # noqa: E402

from seismo.diagnose import Diagnoser, default_detectors  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- pythia-detection:begin -->", "<!-- pythia-detection:end -->"
SHARP = ("spike", "blip")
SLOW = ("bump", "level_shift", "drift")
MERGE = 200


def seismo_alarms(steps: np.ndarray, loss: np.ndarray) -> list[tuple[int, str]]:
    """(step known, severity) of seismo's loss events."""
    events = Diagnoser(default_detectors()).replay({"loss": (steps, loss)})
    return sorted((int(e.evidence.get("detected_at", e.step)), e.severity) for e in events
                  if e.kind in ("loss_spike", "loss_divergence", "loss_regression"))


CACHE = Path(__file__).resolve().parent / ".cache" / "pythia_peers"


def peer_alarms(rule, loss: np.ndarray, steps: np.ndarray, name: str) -> list[int]:
    """The steps a peer rule flags (cached per run and rule source: the rules are slow and fixed)."""
    src = hashlib.sha256((Path(__file__).resolve().parent / "_detection_peers.py").read_bytes()).hexdigest()[:12]
    path = CACHE / f"{name}.{rule.name}.{src}.json"
    if path.exists():
        return json.loads(path.read_text())
    out = [int(s) for s, x in zip(steps.tolist(), loss.tolist()) if rule.update(x)]
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return out


def episodes(alarm_steps: list[int]) -> list[int]:
    """First step of each alarm episode (alarms less than MERGE steps apart are one episode)."""
    out: list[int] = []
    last = None
    for s in sorted(alarm_steps):
        if last is None or s - last >= MERGE:
            out.append(s)
        last = s
    return out


def window(lab: Label) -> tuple[int, int]:
    return (lab.onset - 20, lab.onset + 50) if lab.kind in SHARP else (lab.onset - 500, lab.onset + 2000)


def score(alarms: list[int], labels: list[Label], n_steps: int) -> dict:
    """Found / lag per labelled episode, and false-alarm episodes outside the labelled windows."""
    found: dict[str, list[int | None]] = defaultdict(list)
    missed: list[str] = []
    arr = np.asarray(sorted(alarms), dtype=np.int64)
    for lab in labels:
        if lab.kind == "turbulent":
            continue
        lo, hi = window(lab)
        hit = arr[(arr >= lo) & (arr <= hi)]
        found[lab.kind].append(int(hit[0]) - lab.onset if len(hit) else None)
        if not len(hit):
            missed.append(f"{lab.kind} {lab.onset}")
    free = [(lab.onset - 500, lab.end + 2000) for lab in labels if lab.kind != "turbulent"]
    turb = [(lab.onset, lab.end) for lab in labels if lab.kind == "turbulent"]
    false = [s for s in episodes(alarms) if not any(a <= s <= b for a, b in free + turb)]
    clean_steps = n_steps - sum(min(b, n_steps) - a for a, b in turb)
    return {"found": dict(found), "false": false, "clean_steps": clean_steps, "missed": missed}


def run_all(data: Path) -> tuple[dict, dict]:
    labels = load_labels()
    per: dict[str, dict[str, dict]] = defaultdict(dict)
    timing = {"steps": 0, "replay_s": 0.0}
    for name in runs(data):
        steps, loss = load_loss(data, name)
        labs = [lab for lab in labels if lab.run == name]
        t0 = time.perf_counter()
        s_alarms = seismo_alarms(steps, loss)
        timing["replay_s"] += time.perf_counter() - t0
        timing["steps"] += len(loss)
        per["seismo (warning+)"][name] = score([s for s, sev in s_alarms if sev != "info"], labs, len(loss))
        per["seismo (any)"][name] = score([s for s, _ in s_alarms], labs, len(loss))
        for rule in (OlmoSpikeRule(), FoundryKillLossSpike(len(loss)), LightningSpikeDetection()):
            per[rule.name][name] = score(peer_alarms(rule, loss, steps, name), labs, len(loss))
        print(f"  {name}: {len(loss):,} steps scored", file=sys.stderr)
    return per, timing


def _frac(found: dict, kinds: tuple[str, ...]) -> tuple[int, int, float | None]:
    lags = [x for k in kinds for x in found.get(k, [])]
    hit = [x for x in lags if x is not None]
    return len(hit), len(lags), (float(np.median(hit)) if hit else None)


def summary(per: dict) -> list[dict]:
    rows = []
    for det, by_run in per.items():
        f: dict[str, list] = defaultdict(list)
        false, clean, missed = [], 0, []
        for name, sc in by_run.items():
            missed.extend(f"{name} {m}" for m in sc["missed"])
            for kind, lags in sc["found"].items():
                f[kind].extend(lags)
            false.extend((name, s) for s in sc["false"])
            clean += sc["clean_steps"]

        rows.append(dict(detector=det, spikes=_frac(f, ("spike",)), blips=_frac(f, ("blip",)), slow=_frac(f, SLOW),
                         false=len(false), per100k=len(false) / clean * 1e5, false_at=false[:12], missed=missed))
    return rows


def table(rows: list[dict]) -> str:
    def cell(t):
        n, total, lag = t
        return f"{n}/{total}" + (f" ({lag:+.0f})" if lag is not None else "")

    out = ["| detector | sharp spikes found (median lag) | one-step blips | bumps, level shifts, drifts (median lag) "
           "| false-alarm episodes | per 100k steps |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['detector']} | {cell(r['spikes'])} | {cell(r['blips'])} | {cell(r['slow'])} "
                   f"| {r['false']} | {r['per100k']:.2f} |")
    return "\n".join(out)


def prose(rows: list[dict], timing: dict) -> str:
    by = {r["detector"]: r for r in rows}
    s, a, o = by["seismo (warning+)"], by["seismo (any)"], by["olmo_core"]
    goal_spikes = a["spikes"][0] == a["spikes"][1]
    goal_slow = s["slow"][0] >= 0.9 * s["slow"][1]  # an info-level outlier inside a bump's window is not a detection of it
    goal_false = s["per100k"] <= 1.0
    lines = [
        f"seismo reports {a['spikes'][0]} of the {a['spikes'][1]} labelled sharp spikes at any severity "
        f"({s['spikes'][0]} as warning or critical) and {s['slow'][0]} of the {s['slow'][1]} bumps, level shifts and drifts as warnings "
        f"({a['slow'][0]} counting info-level outliers that fall in their windows); "
        f"OLMo-core's two-sided 6-sigma rule finds {o['spikes'][0]} spikes and {o['slow'][0]} slow episodes.",
        f"Warning-or-critical false-alarm episodes: {s['false']} ({s['per100k']:.2f} per 100,000 steps); "
        f"counting info-level outliers too: {a['false']} ({a['per100k']:.2f}).",
        "Goal (every sharp spike, >= 90% of bumps, <= 1 false alarm per 100,000 steps): "
        + ", ".join(f"{what} {'met' if ok else 'missed'}" for what, ok in
                    (("spikes", goal_spikes), ("bumps", goal_slow), ("false alarms", goal_false))) + ".",
        f"seismo's misses (any severity): {'; '.join(a['missed']) or 'none'}.",
        f"Its warning-or-critical false alarms: {'; '.join(f'{n} at {s}' for n, s in s['false_at']) or 'none'}.",
        f"The replay ran at {timing['steps'] / timing['replay_s']:,.0f} steps/s ({cpu_model()}).",
    ]
    return "\n".join(lines)


def write_docs(text: str) -> None:
    doc = DOCS.read_text()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in doc:
        doc = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, doc, flags=re.S)
    else:
        doc = doc.rstrip() + "\n\n### Real runs: PolyPythia loss logs\n\n" + block + "\n"
    DOCS.write_text(doc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    per, timing = run_all(args.data)
    rows = summary(per)
    text = table(rows) + "\n\n" + prose(rows, timing)
    print(text)
    for r in rows:
        print(f"{r['detector']}: false alarms at {r['false_at']}; missed: {r['missed']}")
    if args.write_docs:
        write_docs(text)
        print(f"wrote {DOCS}")


if __name__ == "__main__":
    main()
