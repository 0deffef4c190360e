"""Reading a spike autopsy's replays: peak, recovery, the signals that moved, and the verdict.

The method is the one PaLM's authors applied by hand (Chowdhery et al. 2022, arXiv 2204.02311,
section 5.1: restarting ~100 steps before a spike and feeding other batches removed it; the spike
came from particular batches *together with* the model state) and the one Megatron-LM automates
for hardware faults (rerun the step and compare bitwise). Every replay starts from the same
checkpoint; the same-data replay is the reference its peak is measured against:

* the *baseline* is the median loss of the same-data replay before the spike (first half of the
  window); a replay's *height* is ``log(peak / baseline)`` (infinite if it diverged): a loss
  that jumps from 3 to 3000 and one that jumps from 3 to 1000 are both blow-ups, which a
  difference would not say. For losses that are not all positive (a log-likelihood, say) the
  height is ``peak - baseline``;
* a replay *removes* the spike when its height is below ``REMOVED`` x the reference height,
  *reduces* it below ``REDUCED`` x, and *delays* it when its peak comes more than ``DELAY`` steps
  after the spike step and it does not remove it;
* *steps to recover*: from the peak to the first step whose loss is back within
  ``RECOVERED`` x the reference height of the baseline (``None``: not within the replay);
* a same-data height under ``MIN_HEIGHT`` or under ``NOISE_MULT`` robust standard deviations
  (1.4826 x MAD) of the pre-spike heights is no spike: the verdict says so rather than read noise;
* a replay whose signal family ends at least 3x lower or higher than in the same-data replay is
  named with it (``QK-Clip 100 ends with attn/logit_max x0.004``): what a mitigation does to the
  signals even where the loss does not spike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["ReplayRow", "AutopsyVerdict", "analyse", "REMOVED", "REDUCED", "RECOVERED", "MIN_HEIGHT"]

REMOVED = 0.35
REDUCED = 0.7
RECOVERED = 0.25
MIN_HEIGHT = 0.05  # a smaller same-data peak (log(peak / baseline)) is no spike to explain
NOISE_MULT = 4.0  # nor one within 4 robust standard deviations of the losses before it
DELAY = 3


@dataclass
class ReplayRow:
    """One line of the autopsy table."""

    name: str
    kind: str
    status: str
    peak_loss: float
    peak_step: int | None
    height: float
    steps_to_recover: int | None
    final_loss: float
    effect: str  # reference | removes | reduces | delays | no effect | worse | failed
    moved: list[str] = field(default_factory=list)  # signals that moved against the same-data replay
    bitwise: bool | None = None  # same-data replay only: equal to the recorded losses?
    signal_max: dict[str, float] = field(default_factory=dict)  # per signal family, the largest |value| over the replay
    signal_final: dict[str, float] = field(default_factory=dict)  # per signal family, the largest |value| over modules at its last step
    run_id: int | None = None
    error: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class AutopsyVerdict:
    cause: str  # data | data+state | state | not reproduced | no spike
    sentence: str
    rows: list[ReplayRow]
    start: int
    spike: int
    stop: int
    baseline: float
    reference_height: float  # log(peak / baseline) of the same-data replay (peak - baseline for losses that are not all positive)
    reproduced: str  # "bitwise" | "not bitwise (max |diff| x at step s)" | "not checked"
    fixes: list[str] = field(default_factory=list)  # replays that remove the spike
    min_height: float = 0.0  # the smallest reference height taken as a spike (MIN_HEIGHT, or NOISE_MULT x the pre-spike noise)
    signal_effects: list[str] = field(default_factory=list)

    def row(self, name: str) -> ReplayRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no replay {name!r}; replays: {[r.name for r in self.rows]}")

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "rows"}
        d["rows"] = [r.to_dict() for r in self.rows]
        return d


def _peak(steps: np.ndarray, losses: np.ndarray, status: str) -> tuple[float, int | None]:
    if status == "diverged" or (len(losses) and not np.isfinite(losses).all()):
        bad = np.flatnonzero(~np.isfinite(losses))
        return math.inf, int(steps[bad[0]]) if len(bad) else (int(steps[-1]) if len(steps) else None)
    if not len(losses):
        return math.nan, None
    i = int(np.argmax(losses))
    return float(losses[i]), int(steps[i])


def _recovery(steps: np.ndarray, losses: np.ndarray, peak_step: int | None, level: float) -> int | None:
    if peak_step is None:
        return None
    after = np.flatnonzero((steps > peak_step) & (losses <= level))
    return int(steps[after[0]] - peak_step) if len(after) else None


def _family(name: str) -> str:
    parts = name.split("/")
    return "/".join(parts[:2]) if len(parts) > 2 else name


def _family_peaks(history: dict, lo: int, hi: int) -> dict[str, float]:
    """Per signal family (``grad/norm``, ``attn/logit_max``, ...): the largest |value| over modules in steps [lo, hi]."""
    out: dict[str, float] = {}
    for name, (s, v) in history.items():
        if name.startswith(("loss", "val/")):
            continue
        s, v = np.asarray(s), np.abs(np.asarray(v, dtype=float))
        sel = v[(s >= lo) & (s <= hi)]
        sel = sel[np.isfinite(sel)]
        if len(sel):
            fam = _family(name)
            out[fam] = max(out.get(fam, 0.0), float(sel.max()))
    return out


def _family_finals(history: dict) -> dict[str, float]:
    """Per signal family: the largest |value| over modules at the family's last recorded step."""
    last: dict[str, tuple[int, float]] = {}
    for name, (s, v) in history.items():
        if name.startswith(("loss", "val/")) or not len(s):
            continue
        fam, step, value = _family(name), int(s[-1]), abs(float(v[-1]))
        if not math.isfinite(value):
            continue
        prev = last.get(fam)
        if prev is None or step > prev[0] or (step == prev[0] and value > prev[1]):
            last[fam] = (step, value)
    return {fam: v for fam, (_, v) in last.items()}


# signals whose ratios mean little: Adam statistics every 10 steps, entropies near 0 after a collapse, fractions
_NOT_COMPARED = ("adam/", "grad/nonfinite", "attn/entropy", "logits/zero", "logits/softmax")


def signal_effects(rows: list, min_ratio: float = 3.0, top: int = 4) -> list[str]:
    """Replays that end with a signal family at least ``min_ratio`` x lower (or higher) than the
    same-data replay, e.g. ``"QK-Clip 100 ends with attn/logit_max x0.004"``, strongest first."""
    same = next(r for r in rows if r.name == "same data")
    found = []
    for r in rows:
        if r is same or r.status == "failed":
            continue
        for fam, v in r.signal_final.items():
            ref = same.signal_final.get(fam)
            if ref and v > 0 and (v / ref <= 1 / min_ratio or v / ref >= min_ratio) and not fam.startswith(_NOT_COMPARED):
                found.append((abs(math.log(v / ref)), f"{r.name} ends with {fam} x{v / ref:.2g}"))
    seen: set[str] = set()
    out = []
    for _, text in sorted(found, reverse=True):  # the strongest change per replay
        name = text.split(" ends with ")[0]
        if name not in seen:
            seen.add(name)
            out.append(text)
    return out[:top]


def signals_moved(history: dict, reference: dict, lo: int, hi: int, top: int = 3, min_ratio: float = 1.5) -> list[str]:
    """The signal families whose peak over steps [lo, hi] differs most from ``reference``'s
    (a ratio of at least ``min_ratio`` either way), as ``"grad/norm x0.08"``."""
    a, b = _family_peaks(history, lo, hi), _family_peaks(reference, lo, hi)
    moved = []
    for fam in set(a) & set(b):
        if a[fam] > 0 and b[fam] > 0:
            r = a[fam] / b[fam]
            if r >= min_ratio or r <= 1 / min_ratio:
                moved.append((abs(math.log(r)), f"{fam} x{r:.2g}"))
    return [text for _, text in sorted(moved, reverse=True)[:top]]


def signals_at_spike(history: dict, start: int, spike: int, stop: int, top: int = 3, min_ratio: float = 1.5) -> list[str]:
    """For the same-data replay: the families whose peak around the spike most exceeds their
    level before it (median of the family's per-step maxima in the first half of the window)."""
    lo = start + max(1, (spike - start) // 2)
    before = {}
    for name, (s, v) in history.items():
        if name.startswith(("loss", "val/")):
            continue
        s, v = np.asarray(s), np.abs(np.asarray(v, dtype=float))
        sel = v[(s >= start) & (s < lo) & np.isfinite(v)]
        if len(sel):
            fam = _family(name)
            before[fam] = max(before.get(fam, 0.0), float(np.median(sel)))
    at = _family_peaks(history, max(start, spike - 2), min(stop - 1, spike + 2))
    moved = [(at[f] / before[f], f) for f in set(at) & set(before) if before[f] > 0 and at[f] / before[f] >= min_ratio]
    return [f"{f} x{r:.2g}" for r, f in sorted(moved, reverse=True)[:top]]


def _diff(a: float, b: float) -> float:
    if math.isfinite(a) and math.isfinite(b):
        return abs(a - b)
    return 0.0 if (math.isnan(a) and math.isnan(b)) or a == b else math.inf


def _bitwise(rec: dict, recorded: dict[int, float] | None) -> tuple[bool | None, str]:
    if not recorded:
        return None, "not checked (no recorded losses)"
    pairs = [(s, v, recorded[s]) for s, v in zip(rec["steps"], rec["losses"]) if s in recorded]
    if not pairs:
        return None, "not checked (no recorded losses in the window)"
    diffs = [(_diff(v, r), s) for s, v, r in pairs]
    worst, at = max(diffs)
    if worst == 0.0:
        return True, f"bitwise ({len(pairs)} steps)"
    return False, f"not bitwise (max |diff| {worst:.3g} at step {at})"


def analyse(records: list[dict], kinds: dict[str, str], *, start: int, spike: int, stop: int,
            recorded: dict[int, float] | None = None, skip_from: int | None = None) -> AutopsyVerdict:
    """The table and the verdict from the replays' records (see :func:`seismo.proxy.autopsy_replay.run_replay`).
    ``records`` must hold the ``"same data"`` replay; ``recorded`` is the original run's loss per step."""
    by_name = {r["name"]: r for r in records}
    same = by_name.get("same data")
    if same is None or not same["steps"]:
        raise ValueError("the autopsy needs its 'same data' replay, and it recorded no step" + (f": {same['error']}" if same else ""))
    s_steps, s_losses = np.asarray(same["steps"]), np.asarray(same["losses"], dtype=float)
    pre = s_losses[s_steps < start + max(1, (spike - start) // 2)]
    baseline = float(np.median(pre[np.isfinite(pre)])) if np.isfinite(pre).any() else float(s_losses[0])
    ref_peak, ref_step = _peak(s_steps, s_losses, same["status"])
    positive = baseline > 0 and all(np.nanmin(np.asarray(r["losses"], dtype=float), initial=math.inf) > 0 for r in records)

    def height_of(peak: float) -> float:
        return (math.log(peak / baseline) if peak < math.inf else math.inf) if positive else peak - baseline

    def loss_at(height: float) -> float:
        return baseline * math.exp(height) if positive else baseline + height

    ref_height = height_of(ref_peak)
    pre_h = np.array([height_of(x) for x in pre if np.isfinite(x) and (x > 0 or not positive)])
    noise = 1.4826 * float(np.median(np.abs(pre_h - np.median(pre_h)))) if len(pre_h) > 2 else 0.0
    min_height = max(MIN_HEIGHT, NOISE_MULT * noise)
    bitwise, reproduced = _bitwise(same, recorded)
    if recorded:  # the spike as recorded: did the same-data replay reproduce it?
        rec_window = [recorded[s] for s in range(start, stop) if s in recorded]
        rec_max = max(rec_window) if all(math.isfinite(v) for v in rec_window) else math.inf
        rec_height = height_of(rec_max) if rec_window and rec_max > 0 else math.nan
    else:
        rec_height = ref_height
    rows = []
    for rec in records:
        steps, losses = np.asarray(rec["steps"]), np.asarray(rec["losses"], dtype=float)
        peak, pstep = _peak(steps, losses, rec["status"])
        height = height_of(peak) if math.isfinite(peak) or peak == math.inf else math.nan
        level = loss_at(RECOVERED * (ref_height if math.isfinite(ref_height) else 1.0))
        recover = 0 if height <= RECOVERED * ref_height else _recovery(steps, losses, pstep, level)
        tail = losses[-5:]
        final = float(np.mean(tail)) if len(tail) and np.isfinite(tail).all() else math.nan
        if rec["name"] == "same data":
            effect = "reference"
            moved = signals_at_spike(rec["history"], start, spike, stop)
        elif rec["status"] == "failed" or not len(steps):
            effect, moved = "failed", []
        else:
            effect = _effect(height, ref_height, pstep, spike)
            moved = signals_moved(rec["history"], same["history"], max(start, spike - 2), min(stop - 1, spike + 2))
        rows.append(ReplayRow(rec["name"], kinds.get(rec["name"], ""), rec["status"], peak, pstep, height, recover, final, effect,
                              moved, bitwise if rec["name"] == "same data" else None, _family_peaks(rec["history"], start, stop),
                              _family_finals(rec["history"]),
                              rec.get("run_id"), rec.get("error", "")))
    verdict = AutopsyVerdict("", "", rows, start, spike, stop, baseline, ref_height, reproduced, min_height=min_height)
    verdict.fixes = [r.name for r in rows if r.effect == "removes" and r.kind in ("lr", "mitigation")]
    verdict.signal_effects = signal_effects(rows)
    verdict.cause, verdict.sentence = _sentence(verdict, rec_height, skip_from)
    if verdict.cause in ("no spike", "not reproduced"):  # nothing to remove: effects on noise mean nothing
        verdict.fixes = []
        for r in rows:
            r.effect = r.effect if r.effect in ("reference", "failed") else "-"
    if verdict.signal_effects:
        verdict.sentence += "; over the replay, " + ", ".join(verdict.signal_effects) + " of the same-data replay's value"
    return verdict


def _effect(height: float, ref: float, peak_step: int | None, spike: int) -> str:
    if not math.isfinite(ref):  # the reference diverged: anything that stays finite at least reduces it
        return "no effect" if not math.isfinite(height) else ("removes" if height < 1.0 else "reduces")
    if not math.isfinite(height) or height > ref * 1.3:
        return "worse"
    if height < REMOVED * ref:
        return "removes"
    if peak_step is not None and peak_step > spike + DELAY:
        return "delays"
    if height < REDUCED * ref:
        return "reduces"
    return "no effect"


def _names(rows: list[ReplayRow]) -> str:
    names = [r.name for r in rows]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _sentence(v: AutopsyVerdict, recorded_height: float, skip_from: int | None) -> tuple[str, str]:
    same = v.row("same data")
    parts = []
    if same.bitwise is False:
        parts.append(f"the same-data replay is {v.reproduced}: the run is not deterministic on this machine "
                     "(thread count, kernels) or the hardware erred")
    if not (v.reference_height >= v.min_height):
        if math.isfinite(recorded_height) and recorded_height >= v.min_height:
            return "not reproduced", "; ".join(parts + [
                f"the same-data replay from step {v.start} does not reproduce the spike (height {v.reference_height:.3g} "
                f"against {recorded_height:.3g} recorded): non-determinism or a hardware error, not the data or the state"])
        return "no spike", (f"No loss spike between steps {v.start} and {v.stop - 1}: the same-data peak {same.peak_loss:.4g} at step "
                            f"{same.peak_step} is {v.reference_height:.3g} over the baseline, within the noise ({v.min_height:.3g})")
    rows = {r.name: r for r in v.rows}
    other, reorder = rows.get("other data"), rows.get("reordered data")
    lo = v.start
    if other is not None and other.effect == "removes":
        skip = rows.get("skip spike batches")
        if skip is not None and skip.effect == "removes" and skip_from is not None:
            lo = skip_from
        if reorder is not None and reorder.effect == "removes":
            cause = "data+state"
            parts.append(f"the spike comes from batches {lo}..{v.spike} together with the state: other batches, "
                         "or the same ones in another order, do not spike")
        else:
            cause = "data"
            parts.append(f"the spike comes from the data: batches {lo}..{v.spike} spike in any order, other batches do not")
    elif other is not None:
        cause = "state"
        parts.append("the spike does not come from the data (other batches spike too): it comes from the model and "
                     "optimizer state, or the step size")
    else:
        cause = "state"
        parts.append("no other-data replay: the data cannot be ruled out")
    mitig = [r for r in v.rows if r.kind == "mitigation"]
    lr = [r for r in v.rows if r.kind == "lr"]
    for effect in ("removes", "reduces", "delays"):
        hits = [r for r in mitig if r.effect == effect]
        if hits:
            parts.append(f"{_names(hits)} {effect if len(hits) == 1 else effect[:-1]} it")
    lr_effects = {r.effect for r in lr}
    for effect, text in (("removes", "removes it"), ("delays", "delays it"), ("reduces", "reduces it")):
        if effect in lr_effects:
            which = [r.name for r in lr if r.effect == effect]
            parts.append(f"a lower LR ({', '.join(which)}) {text}")
            break
    else:
        if lr:
            parts.append("a lower LR does not help")
    text = "; ".join(parts)
    return cause, text[0].upper() + text[1:]
