"""Every number in docs/REPRODUCTIONS.md, recomputed from the stored sweeps.

The sweeps' trials are committed as JSON (``docs/reproductions/<preset>/trials.json``: one row per
trial, the run store's meta of each). The doc's result blocks, between
``<!-- BEGIN GENERATED <preset> -->`` and ``<!-- END GENERATED <preset> -->``, are generated from
them by this script, verdicts included (by the rules printed in the doc); the prose outside the
blocks quotes no measured number. So the doc cannot drift from the data:

    python bench/check_reproductions.py                  # check: exit 1 and a diff on any mismatch
    python bench/check_reproductions.py --write          # regenerate the blocks in place
    python bench/check_reproductions.py --export runs/seismo.sqlite qk_layernorm [--quick]
                                                         # store -> docs/reproductions/qk_layernorm/trials.json
    python bench/check_reproductions.py --run runs/seismo.sqlite warmup --quick
                                                         # run a preset over 3 seeds, seed by seed, then export
    python bench/check_reproductions.py --export runs/seismo.sqlite qk_clip --reuse qk_layernorm
                                                         # the arms run in the store + the other preset's
                                                         # stored trials of the arms it shares (same configs)

Measures: :mod:`seismo.proxy.measures` (Wortsman et al. 2023, arXiv 2309.14322).
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from seismo.proxy.measures import (
    UNSTABLE_MARGIN,
    Spread,
    capped_final_loss,
    cell_spread,
    scaling_prediction,
    seed_spread,
    sensitivity_over_seeds,
)

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "REPRODUCTIONS.md"
DATA = ROOT / "docs" / "reproductions"
# the per-trial fields kept in trials.json (the run's meta as seismo sweep stores it)
FIELDS = ("intervention", "size", "lr", "seed", "status", "init_loss", "final_val_loss", "final_train_loss", "max_attn_logit",
          "final_logz", "n_params", "diverged_at", "steps_done", "wall_time", "final_val_acc", "final_train_acc", "grok_step",
          "max_softmax_collapse", "sharpness_ratio", "max_sharpness_ratio")
ATTN_FAILURE = 1e3  # the attention_logit_growth detector's failure level (seismo.cli.sweep.attention_failure_threshold)
SIZE_ORDER = ("xxs", "xs", "s", "m", "l", "mlp64", "mlp200", "w32", "w64")


# --- export: run store -> trials.json ------------------------------------------------------------------

def export(store_paths: str, preset: str, quick: bool) -> Path:
    """Write the finished trials of ``preset`` in ``store_paths`` (one run store, or several separated
    by commas) to docs/reproductions/<preset>/trials.json (one per intervention, size, LR and seed:
    the newest of a store if a cell was run twice, the later store's if two stores have it)."""
    from seismo.proxy.sweep import load_sweep_results
    from seismo.proxy.sweep_presets import get_sweep_preset

    sweep = get_sweep_preset(preset, quick)
    rows = [r for path in store_paths.split(",") for r in sorted(load_sweep_results(path, sweep.name), key=lambda r: r["run_id"])]
    cells: dict[tuple, dict] = {}
    for r in rows:
        cells[(r["intervention"], r["size"], float(r["lr"]), int(r["seed"]))] = {k: r.get(k) for k in FIELDS}
    trials = sorted(cells.values(), key=lambda r: (r["intervention"], _size_key(r["size"]), r["lr"], r["seed"]))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    out = DATA / preset / "trials.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = dict(preset=preset, sweep=sweep.name, quick=quick, seismo_commit=commit, torch_threads_per_trial=1,
               overrides=sweep.overrides, interventions=sweep.interventions, sizes=sweep.sizes, lrs=sweep.lrs,
               trials=trials)
    out.write_text(json.dumps(doc, indent=1, sort_keys=False, default=_json_default) + "\n")
    return out


def export_reusing(store_paths: str, preset: str, quick: bool, source: str) -> Path:
    """Like :func:`export`, but the arms ``preset`` shares with the stored preset ``source`` (e.g.
    qk_clip's baseline and qk_norm, from qk_layernorm) come from ``source``'s trials.json, at the
    sizes where the store holds ``preset``'s other arms. Refused unless each reused trial's config
    is identical under both presets at this revision (same trial key)."""
    from seismo.proxy.sweep import expand, load_sweep_results
    from seismo.proxy.sweep_presets import get_sweep_preset

    sweep, src_sweep = get_sweep_preset(preset, quick), get_sweep_preset(source, quick)
    src = json.loads((DATA / source / "trials.json").read_text())
    shared = [iv for iv in src["interventions"] if iv in sweep.interventions]
    keys = {(t.intervention, t.size, t.lr, t.seed): t.key for t in expand(sweep)}
    src_keys = {(t.intervention, t.size, t.lr, t.seed): t.key for t in expand(src_sweep)}
    rows = [r for path in store_paths.split(",") for r in sorted(load_sweep_results(path, sweep.name), key=lambda r: r["run_id"])]
    new = {(r["intervention"], r["size"], float(r["lr"]), int(r["seed"])): {k: r.get(k) for k in FIELDS}
           for r in rows if r["intervention"] not in shared}
    sizes = sorted({c[1] for c in new}, key=_size_key)
    reused = [r for r in src["trials"] if r["intervention"] in shared and r["size"] in sizes]
    for r in reused:
        cell = (r["intervention"], r["size"], float(r["lr"]), int(r["seed"]))
        if keys.get(cell) is None or keys[cell] != src_keys.get(cell):
            raise SystemExit(f"check_reproductions: {source}'s trial {cell} is not {preset}'s config; cannot reuse it")
    trials = sorted(list(new.values()) + reused, key=lambda r: (r["intervention"], _size_key(r["size"]), r["lr"], r["seed"]))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    out = DATA / preset / "trials.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = dict(preset=preset, sweep=sweep.name, quick=quick, seismo_commit=commit, torch_threads_per_trial=1,
               overrides=sweep.overrides, interventions=sweep.interventions, sizes=sweep.sizes, lrs=sweep.lrs,
               reused=dict(source=source, seismo_commit=src["seismo_commit"], interventions=shared, sizes=sizes),
               trials=trials)
    out.write_text(json.dumps(doc, indent=1, sort_keys=False, default=_json_default) + "\n")
    return out


def run(preset: str, quick: bool, store: str, workers: int) -> Path:
    """Run ``preset`` (its quick variant with ``quick``) over the full presets' seeds, one seed after
    the other (a cut-off run leaves whole seeds), then export it: the command behind each block."""
    from seismo.proxy.sweep import run_sweep
    from seismo.proxy.sweep_presets import FULL_SEEDS, get_sweep_preset

    for seed in FULL_SEEDS:
        sweep = get_sweep_preset(preset, quick)
        sweep.seeds = [seed]
        run_sweep(sweep, store, workers=workers)
    return export(store, preset, quick)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o))


def load(preset: str) -> dict | None:
    p = DATA / preset / "trials.json"
    if not p.exists():
        return None
    d = json.loads(p.read_text())
    for r in d["trials"]:
        for k in ("final_val_loss", "max_attn_logit", "final_logz", "init_loss"):
            if r.get(k) is None:
                r[k] = math.nan
    # a seed counts for a cell only with the preset's whole LR grid (a sweep cut off mid-seed leaves partial curves)
    grid = sorted(float(x) for x in d["lrs"])
    groups: dict[tuple, list[dict]] = {}
    for r in d["trials"]:
        groups.setdefault((r["intervention"], r["size"], r["seed"]), []).append(r)
    d["trials"] = [r for g in groups.values() if sorted(float(x["lr"]) for x in g) == grid for r in g]
    d["partial"] = sum(len(g) for g in groups.values() if sorted(float(x["lr"]) for x in g) != grid)
    return d


# --- formatting ------------------------------------------------------------------------------------------

def _size_key(size: str) -> int:
    return SIZE_ORDER.index(size) if size in SIZE_ORDER else len(SIZE_ORDER)


def num(v: float | None) -> str:
    """3 significant digits; 1e3 and above as 1.2e4."""
    if v is None or not math.isfinite(v):
        return "n/a"
    if abs(v) >= 1e3:
        m, e = f"{v:.1e}".split("e")
        return f"{m}e{int(e)}"
    return f"{v:.3g}"


def steps_of(d: dict) -> str:
    return next((o.split("=")[1] for o in d["overrides"] if o.startswith("steps=")), "?")


def fix(v: float, nd: int = 3) -> str:
    return f"{v:.{nd}f}" if math.isfinite(v) else "n/a"


def spread(sp: Spread, nd: int = 3, f: Callable[[float], str] | None = None) -> str:
    """mean ± std [min, max] over seeds."""
    f = f or (lambda v: fix(v, nd))
    if sp.n == 1:
        return f"{f(sp.mean)} (1 seed)"
    return f"{f(sp.mean)} ± {f(sp.std)} [{f(sp.lo)}, {f(sp.hi)}]"


def lr_str(lr: float) -> str:
    """1e-2, 3e-4 (the papers' notation)."""
    m, e = f"{lr:.0e}".split("e")
    return f"{m}e{int(e)}" if int(e) != 0 else m


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def separation(a: Spread, b: Spread) -> str:
    """'lower' if every seed of a is below every seed of b, 'higher' if above, else 'overlap'."""
    if a.hi < b.lo:
        return "lower"
    if a.lo > b.hi:
        return "higher"
    return "overlap"


def verdict_lower(seps: list[str]) -> str:
    """The doc's rule for "the intervention lowers the measure" over a list of cells."""
    if seps and all(s == "lower" for s in seps):
        return "agrees"
    if "lower" in seps:
        return "partly"
    if "higher" in seps:
        return "does not"
    return "not measurable at this scale"


# --- the blocks --------------------------------------------------------------------------------------------

def header_lines(d: dict) -> list[str]:
    rows = d["trials"]
    seeds = sorted({r["seed"] for r in rows})
    sizes = sorted({r["size"] for r in rows}, key=_size_key)
    wall = sum(float(r.get("wall_time") or 0.0) for r in rows) / 60
    steps = steps_of(d)
    kind = "quick variant" if d["quick"] else "full preset"
    return [f"*Data*: `{d['sweep']}` ({kind}), {len(rows)} trials: sizes {', '.join(sizes)}; seeds {', '.join(map(str, seeds))}; "
            f"{steps} steps; {wall:.1f} trial-minutes; seismo {d['seismo_commit']}; "
            f"[trials.json](reproductions/{d['preset']}/trials.json)"
            + (f"; {d['partial']} trials of unfinished seeds left out." if d.get("partial") else "."), ""]


def sensitivity_table(d: dict, control: str, extra: Callable[[str, str], list[str]] | None = None,
                      extra_cols: list[str] | None = None) -> tuple[list[str], dict]:
    rows = d["trials"]
    whole, near = sensitivity_over_seeds(rows), sensitivity_over_seeds(rows, near_best=True)
    loss = cell_spread(rows, "capped_loss")
    body = []
    keys = sorted(whole, key=lambda k: (k[0] != control, k[0], _size_key(k[1])))
    for iv, size in keys:
        cells = {lr: sp for (i, s, lr), sp in loss.items() if (i, s) == (iv, size)}
        best = min(cells, key=lambda lr: cells[lr].mean)
        div = sum(r["status"] == "diverged" for r in rows if (r["intervention"], r["size"]) == (iv, size))
        n = sum(1 for r in rows if (r["intervention"], r["size"]) == (iv, size))
        body.append([iv, size, spread(whole[(iv, size)]), spread(near[(iv, size)]), lr_str(best), spread(cells[best]), f"{div}/{n}"]
                    + (extra(iv, size) if extra else []))
    head = ["intervention", "size", "LR sensitivity, whole grid", "within 10x of the best LR", "best LR (seed mean)",
            "val loss at the best LR", "diverged"] + (extra_cols or [])
    return table(head, body), dict(whole=whole, near=near, loss=loss)


def lowers_verdict(m: dict, control: str, arm: str) -> tuple[str, list[str]]:
    """Verdict and one line per size for "``arm`` has a lower LR sensitivity than ``control``"."""
    seps, lines = [], []
    for iv, size in sorted(m["whole"], key=lambda k: _size_key(k[1])):
        if iv != arm or (control, size) not in m["whole"]:
            continue
        for name in ("whole", "near"):
            a, b = m[name][(arm, size)], m[name][(control, size)]
            s = separation(a, b)
            seps.append(s)
            ratio = fix(b.mean / a.mean, 2) if a.mean > 0 else "n/a"
            lines.append(f"`{size}`, {'whole grid' if name == 'whole' else 'within 10x'}: {arm} {fix(a.mean)} vs {control} "
                         f"{fix(b.mean)} ({control} / {arm} = {ratio}; seeds {s})")
    return verdict_lower(seps), lines


def top_lr_column(d: dict, field: str, f: Callable[[float], str] = num) -> Callable[[str, str], list[str]]:
    top = max(float(r["lr"]) for r in d["trials"])
    cs = cell_spread(d["trials"], field)

    def col(iv: str, size: str) -> list[str]:
        sp = cs.get((iv, size, top))
        return [spread(sp, f=f) if sp else "n/a"]
    return col


def block_qk_layernorm(d: dict) -> list[str]:
    rows = d["trials"]
    top = max(float(r["lr"]) for r in rows)
    out = header_lines(d)
    t, m = sensitivity_table(d, "baseline", top_lr_column(d, "max_attn_logit"), [f"max attention logit at LR {lr_str(top)}"])
    out += t + [""]
    arm_sizes = [{r["size"] for r in rows if r["intervention"] == iv} for iv in ("baseline", "qk_norm")]
    sizes = sorted(arm_sizes[0] & arm_sizes[1], key=_size_key)
    if not sizes:
        return out + ["No size has both arms over a whole LR grid yet."]
    largest = sizes[-1]
    # 1. lower LR sensitivity at the largest size
    seps, lines = [], []
    for name, label in (("whole", "whole grid"), ("near", "within 10x of the best LR")):
        a, b = m[name][("qk_norm", largest)], m[name][("baseline", largest)]
        s = separation(a, b)
        seps.append(s)
        lines.append(f"{label}: {spread(a)} with qk-layernorm vs {spread(b)} without, ratio {fix(b.mean / a.mean, 2)}, seed ranges {s}")
    out.append(f"**Lower LR sensitivity at the largest size (`{largest}`, {m['whole'][('baseline', largest)].n} seeds): "
               f"{verdict_lower(seps)}.** " + "; ".join(lines) + ".")
    out.append("")
    # 2. the gap grows with size
    ratios = [(s, m["whole"][("baseline", s)].mean / m["whole"][("qk_norm", s)].mean) for s in sizes
              if ("baseline", s) in m["whole"] and ("qk_norm", s) in m["whole"]]
    rs = [r for _, r in ratios]
    grows = "agrees" if all(b > a for a, b in zip(rs, rs[1:])) else "partly" if rs[-1] > rs[0] else "does not"
    out.append(f"**The gap grows with size: {grows}.** Ratio of the seed-mean whole-grid sensitivities (baseline / qk-norm): "
               + ", ".join(f"`{s}` {fix(r, 2)}" for s, r in ratios) + " (rule: *agrees* if the ratio rises at every step in "
               "size, *partly* if it is higher at the largest size than at the smallest, else *does not*).")
    out.append("")
    # 3. attention logits bounded
    logit = cell_spread(rows, "max_attn_logit")
    sep = [separation(logit[("qk_norm", s, top)], logit[("baseline", s, top)]) for s in sizes]
    v = "agrees" if all(s == "lower" for s in sep) else verdict_lower(sep)
    qk_max = max(logit[("qk_norm", s, top)].hi for s in sizes)
    base_min = min(logit[("baseline", s, top)].lo for s in sizes)
    out.append(f"**qk-layernorm bounds the attention logits: {v}.** At LR {lr_str(top)} the largest max attention logit of any "
               f"qk-norm trial is {num(qk_max)}; the smallest of any baseline trial is {num(base_min)} (rule: the seeds separate "
               "at every size).")
    out.append("")
    ndiv = sum(r["status"] == "diverged" for r in rows)
    out.append(f"**The baseline's loss diverges at high LR: "
               f"{'agrees' if ndiv else 'not measurable at this scale'}.** {ndiv} of {len(rows)} trials diverged "
               f"(non-finite loss); at {steps_of(d)} steps the baseline's high-LR runs end with a finite, "
               "higher loss instead.")
    out.append("")
    # 4. the held-out prediction
    fit_sizes = sizes[:-1]
    try:
        pts = scaling_prediction(rows, "baseline", largest, ATTN_FAILURE, fit_sizes=fit_sizes)
    except ValueError as exc:
        out.append(f"**Prediction of `{largest}` from the smaller sizes: not measurable at this scale** ({exc}).")
        return out
    body = []
    agree = 0
    for p in pts:
        obs_unstable = p.observed_unstable >= 0.5
        agree += p.predicted_unstable == obs_unstable
        body.append([lr_str(p.lr), num(p.predicted_logit), fix(p.r2, 2) if p.r2 is not None else "n/a", fix(p.exponent, 2),
                     "unstable" if p.predicted_unstable else "stable", num(p.observed_logit),
                     f"{p.observed_unstable:.2f}", "unstable" if obs_unstable else "stable"])
    out += [f"Prediction for `{largest}` (held out) from {', '.join(f'`{s}`' for s in fit_sizes)}: per LR, a power law in "
            f"non-embedding parameters fitted to the seed-mean max attention logit; *predicted unstable* = the extrapolated "
            f"logit reaches {num(ATTN_FAILURE)} (the `attention_logit_growth` failure level); *observed unstable* = in at least "
            f"half of `{largest}`'s seeds the trial diverged or, above that seed's best LR, ended more than "
            f"{UNSTABLE_MARGIN} nats above its best loss.", ""]
    out += table(["LR", "predicted logit", "R^2 (3 sizes)", "exponent", "predicted", f"observed logit (`{largest}`)",
                  "fraction of seeds unstable", "observed"], body)
    out.append("")
    first_pred = next((p.lr for p in pts if p.predicted_unstable), None)
    first_obs = next((p.lr for p in pts if p.observed_unstable >= 0.5), None)
    v = "agrees" if agree == len(pts) else "partly" if agree >= len(pts) / 2 else "does not"
    r2 = [p.r2 for p in pts if p.r2 is not None]
    out.append(f"**Instability at `{largest}` predicted from smaller sizes: {v}.** The prediction is right at {agree} of "
               f"{len(pts)} LRs (rule: all: *agrees*, at least half: *partly*, fewer: *does not*); predicted lowest unstable LR "
               f"{lr_str(first_pred) if first_pred else 'none'}, observed {lr_str(first_obs) if first_obs else 'none'}; "
               f"R^2 of the fits from {fix(min(r2), 2)} to {fix(max(r2), 2)}.")
    return out


QK_CLIP_BOUND = 2.0  # "near tau": a trial's max attention logit at most this many times tau


def block_qk_clip(d: dict) -> list[str]:
    """QK-Clip next to the baseline and qk-layernorm (whose trials may be reused from qk_layernorm)."""
    rows = d["trials"]
    tau = float(next(o.split("=")[1] for o in d["interventions"]["qk_clip"] if o.startswith("qk_clip=")))
    out = header_lines(d)
    reused = d.get("reused")
    if reused:
        n = sum(r["intervention"] in reused["interventions"] for r in rows)
        out += [f"The {n} trials of {', '.join(f'`{iv}`' for iv in reused['interventions'])} are `{reused['source']}`'s "
                f"(run at seismo {reused['seismo_commit']}; [trials.json](reproductions/{reused['source']}/trials.json)): "
                "the same configs, so the same trial keys; only `qk_clip`'s trials were run for this block.", ""]
        base = {(r["size"], r["lr"], r["seed"]): r for r in rows if r["intervention"] == "baseline"}
        pairs = [(r, base[(r["size"], r["lr"], r["seed"])]) for r in rows
                 if r["intervention"] == "qk_clip" and (r["size"], r["lr"], r["seed"]) in base]
        same = [r for r, b in pairs if (r["final_val_loss"], r["final_train_loss"]) == (b["final_val_loss"], b["final_train_loss"])]
        lrs = sorted({float(r["lr"]) for r in same})
        out += [f"Reproduction check: {len(same)} of the {len(pairs)} `qk_clip` trials end "
                "with the final validation and training losses of the reused `baseline` trial of the same size, LR and seed, "
                f"bit for bit (LRs {', '.join(lr_str(x) for x in lrs) or 'none'}). QK-Clip multiplies the weights by exactly 1.0 "
                "while no logit exceeds tau, so in those trials it never fired and they re-run the reused baseline trials at this "
                "revision.", ""]
    if not any(r["intervention"] == "qk_clip" for r in rows):
        return out + ["No size has the `qk_clip` arm over a whole LR grid yet."]
    top = max(float(r["lr"]) for r in rows)
    t, m = sensitivity_table(d, "baseline", top_lr_column(d, "max_attn_logit"), [f"max attention logit at LR {lr_str(top)}"])
    out += t + [""]
    v, lines = lowers_verdict(m, "baseline", "qk_clip")
    out += [f"**`qk_clip` lowers LR sensitivity: {v}.** " + "; ".join(lines) + ".", ""]
    v, lines = lowers_verdict(m, "qk_clip", "qk_norm")
    out += [f"**qk-layernorm has a lower LR sensitivity than QK-Clip: {v}.** " + "; ".join(lines) + ".", ""]
    # the max attention logit per LR
    logit = cell_spread(rows, "max_attn_logit")
    sizes = sorted({r["size"] for r in rows if r["intervention"] == "qk_clip"}, key=_size_key)
    lrs = sorted({float(r["lr"]) for r in rows})
    arms = [iv for iv in ("baseline", "qk_norm", "qk_clip") if any(r["intervention"] == iv for r in rows)]
    body = [[iv, s] + [spread(logit[(iv, s, lr)], f=num) if (iv, s, lr) in logit else "n/a" for lr in lrs] for s in sizes for iv in arms]
    out += ["Max attention logit of each trial (the largest |logit| the monitor recorded over the run), mean ± std "
            "[min, max] over seeds:", ""]
    out += table(["intervention", "size"] + [f"LR {lr_str(lr)}" for lr in lrs], body) + [""]
    clip = [r for r in rows if r["intervention"] == "qk_clip"]
    within = sum(float(r["max_attn_logit"]) <= QK_CLIP_BOUND * tau for r in clip)
    below_base = all(separation(logit[("qk_clip", s, top)], logit[("baseline", s, top)]) == "lower" for s in sizes)
    v = "agrees" if within == len(clip) else "partly" if below_base else "does not"
    worst = max(clip, key=lambda r: float(r["max_attn_logit"]))
    out.append(f"**QK-Clip keeps the max attention logit near tau = {num(tau)}: {v}.** {within} of {len(clip)} QK-Clip trials "
               f"stay at or below {num(QK_CLIP_BOUND * tau)}; the largest is {num(float(worst['max_attn_logit']))} (`{worst['size']}`, "
               f"LR {lr_str(float(worst['lr']))}, seed {worst['seed']}). Rule: every trial at or below {QK_CLIP_BOUND:g} tau: "
               f"*agrees*; else, if at LR {lr_str(top)} every QK-Clip seed is below every baseline seed at each size: *partly*; "
               "else *does not*.")
    return out + signed_max_lines(d, tau)


def signed_max_lines(d: dict, tau: float) -> list[str]:
    """The table of docs/reproductions/qk_clip/signed_max.json (bench/qk_clip_signed_max.py), if any."""
    path = DATA / d["preset"] / "signed_max.json"
    if not path.exists():
        return []
    sm = json.loads(path.read_text())["trials"]
    stored = {(r["size"], float(r["lr"]), r["seed"]): r for r in d["trials"] if r["intervention"] == "qk_clip"}
    same = sum(stored.get((x["size"], float(x["lr"]), x["seed"]), {}).get("final_val_loss") == x["final_val_loss"] for x in sm)
    by: dict[tuple, list[dict]] = {}
    for x in sm:
        by.setdefault((x["size"], float(x["lr"])), []).append(x)
    body = []
    for (size, lr), xs in sorted(by.items(), key=lambda kv: (_size_key(kv[0][0]), kv[0][1])):
        cols = [spread(seed_spread([float(x[k]) for x in xs]), f=num)
                for k in ("max_signed", "max_abs", "steps_signed_over_2tau", "steps_abs_over_2tau", "max_signed_last100")]
        body.append([size, lr_str(lr), ", ".join(str(x["seed"]) for x in sorted(xs, key=lambda x: x["seed"]))] + cols)
    steps = sm[0]["steps"]
    out = ["", f"What QK-Clip bounds (`python bench/qk_clip_signed_max.py`: {len(sm)} of the `qk_clip` trials re-run with the "
           f"monitor off, recording every step's training forward over the whole batch before that step's clip; {same} of {len(sm)} "
           "end with the stored trial's final validation loss bit for bit, so these are the same runs). The *signed* max logit "
           "is the S QK-Clip acts on; the max |logit| is what the monitor records. Mean ± std [min, max] over seeds:", ""]
    out += table(["size", "LR", "seeds", "max signed logit", "max absolute logit", f"steps (of {steps}) with signed max > {num(2 * tau)}",
                  f"steps with max absolute logit > {num(2 * tau)}", "max signed logit, last 100 steps"], body)
    late = sum(x["max_signed_last100"] <= 2 * tau for x in sm)
    out += ["", f"Over the last 100 steps the signed max logit stays at or below {num(2 * tau)} in {late} of these {len(sm)} trials."]
    return out


def block_sensitivity_claim(control: str, arm: str, extra_field: str | None = None, extra_label: str = "",
                            f: Callable[[float], str] = num) -> Callable[[dict], list[str]]:
    def block(d: dict) -> list[str]:
        out = header_lines(d)
        top = max(float(r["lr"]) for r in d["trials"])
        extra = top_lr_column(d, extra_field, f) if extra_field else None
        t, m = sensitivity_table(d, control, extra, [f"{extra_label} at LR {lr_str(top)}"] if extra_field else None)
        out += t + [""]
        v, lines = lowers_verdict(m, control, arm)
        out.append(f"**`{arm}` lowers LR sensitivity: {v}.** " + "; ".join(lines) + ".")
        return out
    return block


def block_z_loss(d: dict) -> list[str]:
    out = block_sensitivity_claim("baseline", "z_loss", "final_logz", "final mean log Z", lambda v: fix(v, 2))(d)
    rows = d["trials"]
    top = max(float(r["lr"]) for r in rows)
    logz = cell_spread(rows, "final_logz")
    seps = [separation(logz[("z_loss", s, top)], logz[("baseline", s, top)]) for s in sorted({r["size"] for r in rows}, key=_size_key)]
    out += ["", f"**z-loss keeps log Z smaller at LR {lr_str(top)}: {verdict_lower(seps)}** (seed ranges per size: {', '.join(seps)})."]
    return out


def block_sigma_reparam(d: dict) -> list[str]:
    out = block_sensitivity_claim("baseline", "sigma_reparam", "max_attn_logit", "max attention logit")(d)
    rows = d["trials"]
    top = max(float(r["lr"]) for r in rows)
    logit = cell_spread(rows, "max_attn_logit")
    sizes = sorted({r["size"] for r in rows}, key=_size_key)
    seps = [separation(logit[("sigma_reparam", s, top)], logit[("baseline", s, top)]) for s in sizes]
    out += ["", f"**sigmaReparam bounds the attention logits at LR {lr_str(top)}: {verdict_lower(seps)}** "
            f"(seed ranges per size: {', '.join(seps)})."]
    return out


def block_mup(d: dict) -> list[str]:
    out = block_sensitivity_claim("standard", "mup")(d)
    rows = d["trials"]
    sizes = sorted({r["size"] for r in rows}, key=_size_key)
    seeds = sorted({r["seed"] for r in rows})
    stable = {}
    for iv in ("standard", "mup"):
        n = 0
        for seed in seeds:
            best = []
            for s in sizes:
                cell = [r for r in rows if (r["intervention"], r["size"], r["seed"]) == (iv, s, seed)]
                best.append(min(cell, key=capped_final_loss)["lr"] if cell else None)
            n += len(set(best)) == 1
        stable[iv] = n
    v = "agrees" if stable["mup"] > stable["standard"] else "does not" if stable["mup"] < stable["standard"] else \
        "not measurable at this scale"
    out += ["", f"**muP keeps the best LR the same across sizes, where the standard parametrization does not: {v}.** "
            f"Seeds whose best LR is the same at every size: muP {stable['mup']} of {len(seeds)}, standard "
            f"{stable['standard']} of {len(seeds)}."]
    return out


def block_grokking(d: dict) -> list[str]:
    rows = d["trials"]
    out = header_lines(d)
    body = []
    by = {}
    for r in rows:
        by.setdefault((r["intervention"], r["lr"]), []).append(r)
    for (iv, lr), rs in sorted(by.items()):
        acc = seed_spread([r.get("final_val_acc", math.nan) for r in rs])
        tr = seed_spread([r.get("final_train_acc", math.nan) for r in rs])
        sc = seed_spread([r.get("max_softmax_collapse", math.nan) for r in rs])
        grok = [r.get("grok_step") for r in rs]
        body.append([iv, lr_str(lr), spread(tr), spread(acc), ", ".join("never" if g is None else str(g) for g in grok), spread(sc)])
    out += table(["intervention", "LR", "train acc", "test acc", "first step with test acc >= 95% (per seed)", "max SC fraction"], body)
    out.append("")
    steps = steps_of(d)

    def grokked(iv):
        rs = [r for r in rows if r["intervention"] == iv]
        return sum(r.get("grok_step") is not None for r in rs), len(rs)
    sc32 = [r.get("max_softmax_collapse", 0) or 0 for r in rows if r["intervention"] == "softmax"]
    sc64 = [r.get("max_softmax_collapse", 0) or 0 for r in rows if r["intervention"] == "softmax_fp64"]
    v1 = ("agrees" if all(x > 0.01 for x in sc32) and not any(x > 0.01 for x in sc64) else
          "not measurable at this scale" if not any(x > 0.01 for x in sc32) else "partly")
    g_sm, n_sm = grokked("stablemax")
    g_pg, n_pg = grokked("perp_grad")
    g64, n64 = grokked("softmax_fp64")
    out.append(f"**(1) float32 softmax reaches Softmax Collapse, float64 delays it: {v1}.** Trials with more than 1% of the rows "
               f"collapsed: fp32 {sum(x > 0.01 for x in sc32)} of {len(sc32)}, fp64 {sum(x > 0.01 for x in sc64)} of {len(sc64)}. "
               f"Whether SC is what stops generalisation needs the fp64 control to grok: it grokked in {g64} of {n64} trials "
               "(rule: every fp32 trial and no fp64 trial: *agrees*; no fp32 trial: *not measurable at this scale*; else *partly*).")
    out.append("")
    out.append(f"**(2) StableMax groks without weight decay: "
               f"{'agrees' if g_sm == n_sm else 'partly' if g_sm else 'not measurable at this scale'}.** {g_sm} of {n_sm} trials "
               f"reached 95% test accuracy in {steps} steps (rule: all: *agrees*, some: *partly*, none: *not measurable at this "
               "scale*, as the paper's StableMax runs take tens of thousands of steps).")
    out.append("")
    out.append(f"**(3) perp-Grad generalises without a memorisation phase: "
               f"{'agrees' if g_pg == n_pg else 'partly' if g_pg else 'does not'}.** {g_pg} of {n_pg} trials reached 95% test "
               f"accuracy within {steps} steps (rule: all: *agrees*, some: *partly*, none: *does not*).")
    return out


def block_eos(d: dict) -> list[str]:
    rows = d["trials"]
    out = header_lines(d)
    body, at_edge, ok = [], 0, 0
    by = {}
    for r in rows:
        by.setdefault((r["size"], r["lr"]), []).append(r)
    for (size, lr), rs in sorted(by.items(), key=lambda kv: (_size_key(kv[0][0]), kv[0][1])):
        med = seed_spread([r.get("sharpness_ratio", math.nan) for r in rs])
        mx = seed_spread([r.get("max_sharpness_ratio", math.nan) for r in rs])
        reached = [r for r in rs if (r.get("max_sharpness_ratio") or 0) >= 0.9]
        at_edge += len(reached)
        ok += sum(0.9 <= r["sharpness_ratio"] <= 1.1 for r in reached)
        body.append([size, lr_str(lr), num(2 / lr), spread(med), spread(mx), f"{len(reached)}/{len(rs)}",
                     spread(seed_spread([r["final_train_loss"] for r in rs]), f=num)])
    out += table(["width", "LR", "2/lr", "sharpness / (2/lr), median over the 2nd half", "max ratio",
                  "trials reaching 0.9 x 2/lr", "final train loss"], body)
    out.append("")
    v = "agrees" if at_edge and ok == at_edge else "partly" if ok else "does not" if at_edge else "not measurable at this scale"
    out.append(f"**Sharpness rises to 2/lr and hovers there: {v}.** Of the {at_edge} trials whose sharpness reached 0.9 x 2/lr, "
               f"{ok} have a second-half median within 10% of 2/lr.")
    return out


def block_spam(d: dict) -> list[str]:
    rows = d["trials"]
    out = header_lines(d)
    val = {(r["intervention"], r["size"], r["lr"], r["seed"]): capped_final_loss(r) for r in rows}
    lrs = sorted({r["lr"] for r in rows})
    sizes = sorted({r["size"] for r in rows}, key=_size_key)
    seeds = sorted({r["seed"] for r in rows})
    arms = [a for a in ("adamw", "spam", "stable_spam", "guard_skip") if any(r["intervention"] == a for r in rows)]
    body, closer = [], {}
    for a in arms:
        for s in sizes:
            gaps = []
            for lr in lrs:
                g = [val[(a, s, lr, k)] - val[("adamw_clean", s, lr, k)] for k in seeds
                     if (a, s, lr, k) in val and ("adamw_clean", s, lr, k) in val]
                gaps.append(seed_spread(g) if g else None)
                if a != "adamw":
                    clean = [val[("adamw_clean", s, lr, k)] for k in seeds if ("adamw_clean", s, lr, k) in val]
                    noise = max(clean) - min(clean) if clean else math.inf
                    for k in seeds:
                        if all((x, s, lr, k) in val for x in (a, "adamw", "adamw_clean")):
                            ref = val[("adamw_clean", s, lr, k)]
                            if val[("adamw", s, lr, k)] - ref <= noise:  # spikes did no damage beyond seed noise here
                                continue
                            c = abs(val[(a, s, lr, k)] - ref) < abs(val[("adamw", s, lr, k)] - ref)
                            closer.setdefault(a, []).append(c)
            body.append([a, s] + [spread(g, f=lambda v: fix(v, 2)) if g else "n/a" for g in gaps])
    out += ["Final validation loss (capped at the initial loss) minus spike-free AdamW's, same size, LR and seed; "
            "mean ± std [min, max] over seeds:", ""]
    out += table(["run", "size"] + [f"LR {lr_str(lr)}" for lr in lrs], body)
    out.append("")
    n_pairs = len(lrs) * len(sizes) * len(seeds)
    out += [f"Only the (size, LR, seed) triples where the spikes damaged plain AdamW by more than the spike-free runs' "
            f"spread over seeds at that size and LR count below: {len(closer.get(arms[1], [])) if len(arms) > 1 else 0} of "
            f"{n_pairs}.", ""]
    for a in arms[1:]:
        c = closer.get(a, [])
        v = ("not measurable at this scale" if len(c) < n_pairs / 3 else "agrees" if all(c) else "partly" if sum(c) > len(c) / 2
             else "does not")
        out.append(f"**`{a}` ends closer to the spike-free run than spiked AdamW: {v}** ({sum(c)} of {len(c)} triples; "
                   "rule: all: *agrees*, more than half: *partly*, else *does not*; fewer than a third of the triples to judge: "
                   "*not measurable at this scale*).")
        out.append("")
    return out[:-1]


BLOCKS: dict[str, Callable[[dict], list[str]]] = {
    "qk_layernorm": block_qk_layernorm,
    "qk_clip": block_qk_clip,
    "z_loss": block_z_loss,
    "warmup": block_sensitivity_claim("warmup_short", "warmup_long"),
    "independent_wd": block_sensitivity_claim("coupled", "independent"),
    "mup": block_mup,
    "sigma_reparam": block_sigma_reparam,
    "seqlen_warmup": block_sensitivity_claim("baseline", "seqlen_warmup"),
    "spam": block_spam,
    "grokking": block_grokking,
    "edge_of_stability": block_eos,
}

VERDICT = re.compile(r"\*\*(.+?): (agrees|partly|does not|not measurable at this scale)\.?\*\*")


def block_summary() -> list[str]:
    """One row per verdict of the other blocks."""
    body = []
    for preset in BLOCKS:
        d = load(preset)
        n_seeds = len({r["seed"] for r in d["trials"]}) if d is not None else 0
        data = "none" if d is None else ("quick variant" if d["quick"] else "full preset") + \
            f", {n_seeds} seed{'s' if n_seeds != 1 else ''}"
        found = VERDICT.findall(generate_block(preset)) if d is not None else []
        missing = ("(no stored sweep)" if d is None else "(no verdict: no size with every arm over a whole LR grid)",
                   "not measured at this revision")
        for claim, verdict in found or [missing]:
            body.append([f"`{preset}`", claim.replace("|", "/"), f"**{verdict}**", data])
    return table(["preset", "claim", "verdict", "data"], body)


BEGIN = "<!-- BEGIN GENERATED {} -->"
END = "<!-- END GENERATED {} -->"


def generate_block(preset: str) -> str:
    if preset == "summary":
        return "\n".join(block_summary())
    d = load(preset)
    if d is None:
        return ("*No stored sweep at this revision*: the preset was not run for lack of CPU time, so this page makes no "
                "measured claim about it.")
    return "\n".join(BLOCKS[preset](d))


def render(text: str) -> str:
    """``text`` with every generated block replaced by its freshly generated content."""
    def sub(m: re.Match) -> str:
        preset = m.group(1)
        if preset not in BLOCKS and preset != "summary":
            raise SystemExit(f"check_reproductions: unknown block {preset!r} in {DOC}")
        return f"{BEGIN.format(preset)}\n{generate_block(preset)}\n{END.format(preset)}"
    return re.sub(r"<!-- BEGIN GENERATED (\S+) -->.*?<!-- END GENERATED \1 -->", sub, text, flags=re.S)


def check(doc: Path = DOC) -> list[str]:
    """The unified diff between the doc and the doc with freshly generated blocks (empty: they match)."""
    text = doc.read_text()
    new = render(text)
    return list(difflib.unified_diff(text.splitlines(), new.splitlines(), str(doc), "generated from the stored sweeps", lineterm=""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="regenerate the blocks of docs/REPRODUCTIONS.md in place")
    ap.add_argument("--export", nargs=2, metavar=("STORE", "PRESET"),
                    help="write PRESET's trials from STORE (or STORE1,STORE2,...) to its trials.json")
    ap.add_argument("--run", nargs=2, metavar=("STORE", "PRESET"),
                    help="run PRESET over 3 seeds into STORE (resumable), then export it")
    ap.add_argument("--quick", action="store_true", help="with --export / --run: the preset's quick variant")
    ap.add_argument("--reuse", metavar="PRESET", help="with --export: take the arms PRESET shares from its stored trials.json")
    ap.add_argument("--workers", type=int, default=2, help="with --run: parallel trials (default 2)")
    args = ap.parse_args(argv)
    if args.run:
        print(run(args.run[1], args.quick, args.run[0], args.workers))
        return 0
    if args.export:
        if args.reuse:
            print(export_reusing(args.export[0], args.export[1], args.quick, args.reuse))
            return 0
        print(export(args.export[0], args.export[1], args.quick))
        return 0
    if args.write:
        DOC.write_text(render(DOC.read_text()))
        print(f"wrote {DOC}")
        return 0
    diff = check()
    if diff:
        print("\n".join(diff))
        print(f"\n{DOC} does not match the stored sweeps: run python bench/check_reproductions.py --write", file=sys.stderr)
        return 1
    n = len(re.findall(r"<!-- BEGIN GENERATED", DOC.read_text()))
    print(f"{DOC}: {n} generated blocks match the stored sweeps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
