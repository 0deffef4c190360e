"""``seismo sweep``: an lr x size x intervention (x seed) grid with LR sensitivity, resumable."""

from __future__ import annotations

import argparse
import math

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from seismo.cli._common import DEFAULT_RUNS_DIR, CLIError, Subcommand, check_directory, console, esc, fmt
from seismo.cli._training import preflight_trials
from seismo.diagnose.detectors import default_detectors
from seismo.proxy.measures import UNSTABLE_MARGIN, lr_sensitivity_near_best, scaling_prediction, sensitivity_over_seeds
from seismo.proxy.sweep import expand, load_sweep_file, load_sweep_results, run_sweep, summarize_sweep
from seismo.proxy.sweep_presets import SWEEP_PRESETS, get_sweep_preset
from seismo.report.sweep_plots import plot_sweep, plot_trial_curves

__all__ = ["Sweep", "EXTRA_MEASURES", "attention_failure_threshold"]

# per-trial measure -> column header (seismo.proxy.measures.trial_measures)
EXTRA_MEASURES = {"final_val_acc": "test acc", "grok_step": "grok step", "max_softmax_collapse": "max SC",
                  "sharpness_ratio": "sharp/thr", "max_sharpness_ratio": "max sharp/thr"}


def attention_failure_threshold() -> float:
    """The max attention logit at which the ``attention_logit_growth`` detector reports a failure:
    read from the detector itself, so a prediction and a live run agree on what "unstable" means."""
    return next(float(d.threshold) for d in default_detectors() if getattr(d, "kind", "") == "attention_logit_growth")


class Sweep(Subcommand):
    name = "sweep"
    help = "lr x size x intervention sweep with LR sensitivity (resumable)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("sweep", help=f"a sweep preset name ({', '.join(SWEEP_PRESETS)}) or a .toml file")
        parser.add_argument("--quick", action="store_true", help="the preset's small variant (about 2 minutes)")
        parser.add_argument("--trials", action="store_true",
                            help="also print one line per trial with its measures (automatic for grokking and edge_of_stability)")
        parser.add_argument("--workers", type=int, default=None, help="parallel trials (default: number of cores)")
        parser.add_argument("--backend", choices=("local", "ray"), default="local")
        parser.add_argument("--ray-address", default=None, help="connect to an existing Ray cluster (default: start a local one)")
        parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override every trial's config")
        parser.add_argument("--predict", metavar="SIZE",
                            help="predict from >= 3 smaller sizes whether SIZE (a size name or parameter count) becomes unstable")
        parser.add_argument("--out", default=DEFAULT_RUNS_DIR, help="directory for the run store and plots (default: runs)")

    def run(self, args: argparse.Namespace) -> int:
        con = console()
        if args.sweep.endswith(".toml"):
            sweep = load_sweep_file(args.sweep)
        else:
            sweep = get_sweep_preset(args.sweep, quick=args.quick)
        sweep.overrides = list(sweep.overrides) + list(args.set or [])
        if args.workers is not None and args.workers < 1:
            raise CLIError(f"--workers: must be >= 1, got {args.workers}")
        out = check_directory(args.out, "--out")
        store_path = out / "seismo.sqlite"
        trials = expand(sweep)  # validates every trial's config before anything runs
        target = _predict_target(sweep, args.predict) if args.predict else None  # a prediction it cannot make: refuse now
        preflight_trials(trials)  # and that each can run here: its device exists, it fits in memory
        grid = f"{len(sweep.interventions)} interventions x {len(sweep.sizes)} sizes x {len(sweep.lrs)} lrs x {len(sweep.seeds)} seeds"
        con.print(f"[bold]sweep {esc(sweep.name)}[/bold]: {len(trials)} trials ({grid}), backend {args.backend}, store {esc(store_path)}")
        with Progress(TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[running]} running"),
                      TimeElapsedColumn(), TimeRemainingColumn(), console=con) as progress:
            task = progress.add_task("sweep", total=len(trials), running=0)

            def on_progress(done, total, running, trial):
                progress.update(task, completed=done, running=running)

            run_sweep(sweep, store_path, workers=args.workers, backend=args.backend, ray_address=args.ray_address, on_progress=on_progress)
        rows = load_sweep_results(store_path, sweep.name, keys={t.key for t in trials})  # this grid only, not older runs of the name
        summary = summarize_sweep(rows, sweep.name)
        _print_sensitivity(con, sweep, rows, summary)
        extra = [k for k in EXTRA_MEASURES if any(k in r for r in rows)]
        # full-batch sweeps (grokking, edge of stability) are judged by these measures, not by the
        # loss-vs-LR table: print their trials; for the others, on request
        if args.trials or any(k in r for r in rows for k in ("final_val_acc", "sharpness_ratio")):
            _print_trials(con, sweep.name, rows, extra)
        try:
            paths = plot_sweep(summary, out / f"sweep-{sweep.name}")
            paths += plot_trial_curves(store_path, rows, out / f"sweep-{sweep.name}")
            con.print("Plots:\n" + "\n".join(f"  {esc(p)}" for p in paths))
        except ImportError as exc:  # matplotlib is the optional extra seismo[plot]
            con.print(f"Plots skipped: {esc(exc)}")
        if target is not None:  # last: if the stored trials cannot carry a fit, the sweep's output is complete anyway
            _print_prediction(con, rows, target)
        return 0


def _near_best(rows: list[dict], iv: str, size: str) -> float:
    """LR sensitivity over the LRs within 10x of the best, on the same seed-mean losses as the
    whole-grid column (:func:`seismo.proxy.sweep.summarize_sweep`)."""
    by_lr: dict[float, list[dict]] = {}
    for r in rows:
        if r["intervention"] == iv and r["size"] == size:
            by_lr.setdefault(float(r["lr"]), []).append(r)
    lrs = sorted(by_lr)
    losses = [float(np.mean([x["final_val_loss"] if x["status"] == "completed" else math.nan for x in by_lr[lr]])) for lr in lrs]
    l0 = float(np.nanmedian([x["init_loss"] for lr in lrs for x in by_lr[lr]]))
    return lr_sensitivity_near_best(lrs, losses, l0)


def _print_sensitivity(con, sweep, rows: list[dict], summary) -> None:
    """The LR-sensitivity table (Wortsman et al. 2023, arXiv 2309.14322): one row per intervention and size.

    Over the whole LR grid and over the LRs within 10x of the best (at a short run's smallest LRs
    under-training dominates the whole-grid value), both on the seed-mean losses; with several
    seeds, also the range of the whole-grid value over the seeds' own loss-vs-LR curves."""
    top = max(sweep.lrs)
    multi = len({r.get("seed", 0) for r in rows}) > 1
    per_seed = sensitivity_over_seeds(rows) if multi else {}
    table = Table(title=Text(f"{sweep.name}: LR sensitivity (Wortsman et al. 2023) per intervention and size"))
    cols = ["intervention", "size", "params", "LR sensitivity", "within 10x of best"] + (["per seed (min-max)"] if multi else [])
    for col in cols + ["best lr", "diverged", f"max attn logit @ lr {top:g}"]:
        table.add_column(col, justify="left" if col in ("intervention", "size") else "right")
    for (iv, size), sens in sorted(summary.sensitivity.items(), key=lambda kv: (kv[0][0], summary.n_params.get(kv[0][1], 0))):
        logits = [r["max_attn_logit"] for r in rows if r["intervention"] == iv and r["size"] == size and r["lr"] == top]
        cells = [Text(iv), Text(size), f"{summary.n_params.get(size, 0):.3g}", f"{sens:.3f}", f"{_near_best(rows, iv, size):.3f}"]
        if multi:
            sp = per_seed.get((iv, size))
            cells.append(f"{sp.lo:.3f}-{sp.hi:.3f} ({sp.n})" if sp is not None else "n/a")
        table.add_row(*cells, f"{summary.best_lr[(iv, size)]:g}", f"{summary.divergence[(iv, size)]:.0%}",
                      fmt(max(logits), 1) if logits else "n/a")
    con.print(table)


def _print_trials(con, name: str, rows: list[dict], extra: list[str]) -> None:
    """One line per trial: its losses and the measures beyond the loss it recorded."""
    table = Table(title=Text(f"{name}: trials"))
    cols = ["intervention", "size", "lr", "status", "train loss", "val loss"] + [EXTRA_MEASURES[k] for k in extra]
    for col in cols:
        table.add_column(col, justify="left" if col in ("intervention", "size", "status") else "right",
                         overflow="fold", no_wrap=col == "intervention")
    for r in sorted(rows, key=lambda r: (r["intervention"], r.get("n_params") or 0, r["lr"], r.get("seed", 0))):
        cells = [Text(r["intervention"]), Text(r["size"]), f"{r['lr']:g}", Text(r["status"]),
                 fmt(r.get("final_train_loss")), fmt(r.get("final_val_loss"))]
        for k in extra:
            v = r.get(k)
            cells.append("never" if v is None and k == "grok_step" else str(v) if isinstance(v, int) else fmt(v))
        table.add_row(*cells)
    con.print(table)


MIN_FIT_SIZES = 3  # a power law through 2 points has R^2 = 1 whatever the data


def _predict_target(sweep, target: str) -> str | float:
    """``--predict SIZE`` as a size name of the sweep or a positive parameter count, checked before
    anything runs: the sweep must have >= :data:`MIN_FIT_SIZES` other sizes to fit."""
    if target in sweep.sizes:
        others, value = len(sweep.sizes) - 1, target
    else:
        try:
            value = float(target)
        except ValueError:
            raise CLIError(f"--predict: {target!r} is neither a size of this sweep ({', '.join(sweep.sizes)}) "
                           "nor a parameter count") from None
        if not (math.isfinite(value) and value > 0):
            raise CLIError(f"--predict: a parameter count must be a positive number, got {target!r}")
        others = len(sweep.sizes)
    if others < MIN_FIT_SIZES:
        raise CLIError(f"--predict: need >= {MIN_FIT_SIZES} sizes smaller than {target} to fit a trend, this sweep has "
                       f"{others} other size{'s' * (others != 1)}: a power law through 2 points has R^2 = 1 by construction")
    return value


def _print_prediction(con, rows: list[dict], target: str | float) -> None:
    """Whether ``target`` becomes unstable, from a power-law fit in size of the smaller sizes'
    seed-mean max attention logit, >= 3 sizes per fit (Wortsman et al. 2023, arXiv 2309.14322,
    §3.1.2), via :func:`seismo.proxy.measures.scaling_prediction`, as bench/check_reproductions.py."""
    threshold = attention_failure_threshold()
    ivs = sorted({r["intervention"] for r in rows})
    base = "baseline" if "baseline" in ivs else ivs[0]
    mine = [r for r in rows if r["intervention"] == base]
    try:
        pts = scaling_prediction(rows, base, target, threshold)
    except ValueError as exc:
        raise CLIError(f"--predict: {exc}") from None
    if not pts:
        raise CLIError(f"--predict: no LR has a positive finite max attention logit at >= {MIN_FIT_SIZES} sizes smaller than {target}")
    n_params = {r["size"]: float(r["n_params"]) for r in mine if r.get("n_params")}
    n_target = n_params[target] if isinstance(target, str) else target
    fit_sizes = sorted((s for s in n_params if n_params[s] < n_target), key=n_params.get)
    seeds = sorted({r.get("seed", 0) for r in mine})
    name = target if isinstance(target, str) else f"{target:g} params"
    con.print(f"\nPrediction for {esc(name)} ({n_target:.3g} params, {esc(base)}) from {len(fit_sizes)} smaller sizes "
              f"({esc(', '.join(fit_sizes))}; seeds {', '.join(map(str, seeds))}): per LR, a power law in size fitted to the "
              f"seed-mean max attention logit; predicted unstable = the extrapolated logit reaches {threshold:g} (the "
              "attention_logit_growth failure level)")
    right = 0
    for p in pts:
        r2 = f"R^2 {p.r2:.2f}" if p.r2 is not None else "R^2 n/a"
        line = (f"  lr {p.lr:g}: predicted {fmt(p.predicted_logit, 1)} -> {'UNSTABLE' if p.predicted_unstable else 'stable'} "
                f"({r2}, exponent {p.exponent:.2f}, {p.n_sizes} sizes); ")
        at = [r for r in mine if r["size"] == target and float(r["lr"]) == p.lr]
        if at and math.isfinite(p.observed_unstable):
            k = round(p.observed_unstable * len(at))
            right += p.predicted_unstable == (p.observed_unstable >= 0.5)
            line += f"observed logit {fmt(p.observed_logit, 1)} (seed mean), unstable by the loss in {k} of {len(at)} seeds"
        else:
            line += "not run"
        con.print(line)
    r2s = [p.r2 for p in pts if p.r2 is not None]
    first = next((p.lr for p in pts if p.predicted_unstable), None)
    con.print(f"  R^2 of the {len(pts)} fits: {min(r2s):.2f} to {max(r2s):.2f}" if r2s else "  R^2: n/a")
    con.print(f"  predicted lowest unstable lr: {first:g}" if first is not None else "  no lr predicted unstable")
    observed = [p for p in pts if math.isfinite(p.observed_unstable)]
    if observed:
        first_obs = next((p.lr for p in observed if p.observed_unstable >= 0.5), None)
        con.print(f"  observed lowest unstable lr (at least half the seeds): {first_obs:g}" if first_obs is not None
                  else "  no lr observed unstable in at least half the seeds")
        con.print(f"  prediction right at {right} of {len(observed)} lrs. Unstable by the loss: the trial diverged or, above its "
                  f"seed's best lr, ended more than {UNSTABLE_MARGIN:g} nats above that seed's best loss")
