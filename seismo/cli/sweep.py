"""``seismo sweep``: an lr x size x intervention (x seed) grid with LR sensitivity, resumable."""

from __future__ import annotations

import argparse
import math

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from seismo.cli._common import DEFAULT_RUNS_DIR, CLIError, Subcommand, check_directory, console, esc, fmt
from seismo.cli._training import preflight_trials
from seismo.diagnose.detectors import default_detectors
from seismo.proxy.measures import predict_unstable_lrs
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
                            help="predict from smaller sizes whether SIZE (a size name or parameter count) becomes unstable")
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
        if args.predict:
            _print_prediction(con, summary, args.predict)
        try:
            paths = plot_sweep(summary, out / f"sweep-{sweep.name}")
            paths += plot_trial_curves(store_path, rows, out / f"sweep-{sweep.name}")
            con.print("Plots:\n" + "\n".join(f"  {esc(p)}" for p in paths))
        except ImportError as exc:  # matplotlib is the optional extra seismo[plot]
            con.print(f"Plots skipped: {esc(exc)}")
        return 0


def _print_sensitivity(con, sweep, rows: list[dict], summary) -> None:
    """The LR-sensitivity table (Wortsman et al. 2023, arXiv 2309.14322): one row per intervention and size."""
    top = max(sweep.lrs)
    table = Table(title=Text(f"{sweep.name}: LR sensitivity (Wortsman et al. 2023) per intervention and size"))
    for col in ("intervention", "size", "params", "LR sensitivity", "best lr", "diverged", f"max attn logit @ lr {top:g}"):
        table.add_column(col, justify="left" if col in ("intervention", "size") else "right")
    for (iv, size), sens in sorted(summary.sensitivity.items(), key=lambda kv: (kv[0][0], summary.n_params.get(kv[0][1], 0))):
        logits = [r["max_attn_logit"] for r in rows if r["intervention"] == iv and r["size"] == size and r["lr"] == top]
        table.add_row(Text(iv), Text(size), f"{summary.n_params.get(size, 0):.3g}", f"{sens:.3f}", f"{summary.best_lr[(iv, size)]:g}",
                      f"{summary.divergence[(iv, size)]:.0%}", fmt(max(logits), 1) if logits else "n/a")
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


def _print_prediction(con, summary, target: str) -> None:
    """Whether ``target`` becomes unstable, from a power-law fit in size of the smaller sizes' max
    attention logit (Wortsman et al. 2023, arXiv 2309.14322, §3.1)."""
    threshold = attention_failure_threshold()
    base = sorted({r["intervention"] for r in summary.rows})[0]
    base = "baseline" if any(r["intervention"] == "baseline" for r in summary.rows) else base
    sized = [r for r in summary.rows if r["intervention"] == base and r["size"] == target and r.get("n_params")]
    if sized:
        n_target = float(sized[0]["n_params"])
    else:
        try:
            n_target = float(target)
        except ValueError:
            sizes = ", ".join(summary.n_params)
            raise CLIError(f"--predict: {target!r} is neither a size of this sweep ({sizes}) nor a parameter count") from None
        if not (math.isfinite(n_target) and n_target > 0):
            raise CLIError(f"--predict: a parameter count must be a positive number, got {target!r}")
    table: dict[float, dict[float, float]] = {}
    for r in summary.rows:
        if r["intervention"] == base and r.get("n_params") and math.isfinite(r.get("max_attn_logit", math.nan)):
            table.setdefault(float(r["lr"]), {})[float(r["n_params"])] = float(r["max_attn_logit"])
    pred = predict_unstable_lrs(table, n_target, threshold)
    if not pred:
        raise CLIError(f"--predict: need at least two sizes smaller than {target} in the sweep to fit a trend")
    con.print(f"\nPrediction for {esc(target)} ({n_target:.3g} params, {esc(base)}) from smaller sizes: "
              f"max attention logit by power-law fit in size (unstable from {threshold:g})")
    for lr, (p, unstable) in pred.items():
        observed = table.get(lr, {}).get(n_target)
        obs = f"observed {fmt(observed, 1)} ({'unstable' if observed >= threshold else 'stable'})" if observed is not None else "not run"
        con.print(f"  lr {lr:g}: predicted {fmt(p, 1)} -> {'UNSTABLE' if unstable else 'stable'}; {obs}")
    first = next((lr for lr, (_, u) in pred.items() if u), None)
    con.print(f"  predicted lowest unstable lr: {first:g}" if first is not None else "  no lr predicted unstable")
