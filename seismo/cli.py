"""The ``seismo`` command line: ``seismo demo | train | runs | presets``.

Every command reports bad input as one line naming the field (exit status 2), never a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence

__all__ = ["main"]

DEFAULT_RUNS_DIR = "runs"


class CLIError(Exception):
    pass


def _console():
    from rich.console import Console

    # Rich wraps tables at 80 columns when the output is not a terminal (a log file, CI): give
    # them room unless the user set COLUMNS.
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(highlight=False, width=140 if wide else None)


def _fmt(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if abs(x) >= 1e4:
        return f"{x:.2e}"
    return f"{x:.{digits}f}" if abs(x) < 100 else f"{x:.1f}"


def _train_with_progress(cfg, console, label: str, resume: bool = False):
    """Run :func:`seismo.proxy.train` with a live rich progress line."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from seismo.proxy.train import train

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=False,
    ) as progress:
        task = progress.add_task(label, total=cfg.steps, stats="")
        from seismo.diagnose.engine import AlertPrinter

        alerts = AlertPrinter(progress.console, quiet_steps=cfg.steps)

        def on_log(step: int, info: dict) -> None:
            logit = info.get("attn_logit_max", math.nan)
            stats = f"loss {_fmt(info['loss'])}  max attn logit {_fmt(logit, 1)}  lr {info['lr']:.2e}"
            progress.update(task, completed=step + 1, stats=stats)
            if info["loss"] != info["loss"] or math.isinf(info["loss"]):
                progress.console.print(f"  [red]step {step + 1}: loss is not finite; the run diverged[/red]")

        result = train(cfg, on_log=on_log, resume=resume, on_event=alerts)
        progress.update(task, completed=result.steps_done)
    return result


def cmd_demo(args) -> int:
    from rich.table import Table

    from seismo.proxy.presets import demo_stable, demo_unstable

    console = _console()
    out = Path(args.out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = [("unstable", demo_unstable()), ("qk-norm + z-loss", demo_stable())]
    console.print(
        "[bold]seismo demo[/bold]: TinyGPT (d=128, 2 layers, 4 heads) on the Python standard library's "
        "source, bytes as tokens.\nFirst at a learning rate ten times too high; then the same run with "
        "qk-layernorm and z-loss (Wortsman et al. 2023).\n"
    )
    results = []
    for label, cfg in runs:
        cfg.run_name = f"{cfg.run_name}-{stamp}"
        cfg.out_dir = str(out / cfg.run_name)
        cfg.store = str(out / "seismo.sqlite")
        if args.steps:
            cfg.steps = args.steps
            cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, max(1, args.steps // 6))
            cfg.eval_every = 0
        results.append((label, _train_with_progress(cfg, console, label)))

    table = Table(title="TinyGPT, same data, same seed, lr 0.1")
    for col in ("run", "final train loss", "final val loss", "max attention logit", "attention events", "status"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for label, r in results:
        n_attn = sum(1 for e in r.events if e.kind.startswith("attention"))
        table.add_row(label, _fmt(r.final_train_loss), _fmt(r.final_val_loss), _fmt(r.max_attn_logit, 1), str(n_attn),
                      "[red]diverged[/red]" if r.status == "diverged" else r.status)
    console.print()
    console.print(table)
    plot_note = ""
    try:
        from seismo.report.plots import plot_runs

        png = plot_runs({label: r.history for label, r in results}, out / f"demo-{stamp}.png",
                        title="seismo demo: TinyGPT at lr 0.1, without and with qk-layernorm + z-loss")
        plot_note = f"  plot:      {png}\n"
    except ImportError as exc:
        plot_note = f"  plot:      skipped ({exc})\n"
    (u, ru), (s, rs) = results
    ratio = ru.max_attn_logit / rs.max_attn_logit if rs.max_attn_logit and rs.max_attn_logit == rs.max_attn_logit else math.nan
    console.print(
        f"\nWithout qk-layernorm the attention logits grew to {_fmt(ru.max_attn_logit, 1)} "
        f"({ratio:,.0f}x the stabilized run): softmax attention saturates to one-hot and the loss "
        f"stalls at {_fmt(ru.final_val_loss)} vs {_fmt(rs.final_val_loss)}.\n"
    )
    from seismo.diagnose.engine import summarize

    d = summarize(ru.events, ru.run_dir or "unstable")
    if d.cause_kind:
        first_warn = min((e.step for e in ru.events if e.kind == "attention_logit_growth"), default=None)
        console.print(f"Diagnosis of the unstable run: {d.cause}.")
        if first_warn is not None:
            console.print(f"  first attention_logit_growth warning at step {first_warn}")
        for rec in d.recommendations[:2]:
            console.print(f"  recommended: {rec['name']} ({rec['how']}) [{rec['paper']}]")
        console.print()
    console.print(
        "Outputs:\n"
        f"  runs:      {ru.run_dir}\n             {rs.run_dir}\n"
        f"{plot_note}"
        f"  run store: {ru.store}\n"
        f"Next: [bold]seismo runs --store {ru.store}[/bold]\n"
        f"      [bold]seismo diagnose {ru.run_id} --store {ru.store}[/bold]"
    )
    return 0


def cmd_diagnose(args) -> int:
    import json

    from seismo.diagnose.engine import diagnose_run

    path = Path(args.store)
    if not path.exists():
        raise CLIError(f"--store: no run store at {path}")
    d = diagnose_run(str(path), args.run, replay=not args.stored_events)
    if args.json:
        print(json.dumps(d.to_dict(), indent=2, default=str))
        return 0
    from rich.table import Table

    console = _console()
    console.print(f"[bold]Diagnosis of run {d.run}[/bold]")
    console.print(f"Likely cause: {d.cause}.")
    if d.events:
        table = Table(title="timeline (first events; grouped by kind and module)")
        for col in ("step", "severity", "kind", "module", "message"):
            table.add_column(col)
        seen: dict[tuple, int] = {}
        for e in d.events:
            key = (e.kind, e.module, e.severity)
            seen[key] = seen.get(key, 0) + 1
            if seen[key] == 1 and len(table.rows) < args.max_events:
                table.add_row(str(e.step), e.severity, e.kind, e.module or "-", e.message)
        console.print(table)
    if d.modules:
        console.print("Modules involved: " + ", ".join(f"{m} ({n})" for m, n in list(d.modules.items())[:8]))
    if d.recommendations:
        console.print("Recommended changes, most likely to help first:")
        for i, r in enumerate(d.recommendations[:6], 1):
            call = f" `{r['call']}`" if r["call"] else ""
            console.print(f"  {i}. {r['name']}: {r['how']}{call}  [{r['paper']}]  (for {r['for']})")
    return 0


def cmd_train(args) -> int:
    from seismo.proxy.config import apply_overrides
    from seismo.proxy.presets import get_preset

    console = _console()
    cfg = get_preset(args.preset)
    apply_overrides(cfg, args.set or [])
    if args.name:
        cfg.run_name = args.name
    if not cfg.store:
        cfg.store = str(Path(args.out) / "seismo.sqlite")
    if getattr(cfg, "kind", "") == "fullbatch":  # a full-batch MLP preset (modular_mlp, eos_mlp)
        from seismo.proxy.fullbatch import train_fullbatch

        if args.resume:
            raise CLIError(f"--resume: full-batch presets ({args.preset}) run in one go; they have no checkpoints")
        cfg.validate()
        Path(args.out).mkdir(parents=True, exist_ok=True)
        with console.status(f"{cfg.run_name}: {cfg.steps} full-batch steps"):
            r = train_fullbatch(cfg)
        from seismo.proxy.measures import trial_measures

        extra = "".join(f", {k} {_fmt(v) if isinstance(v, float) else v}" for k, v in trial_measures(r.history).items())
        console.print(f"{cfg.run_name}: {r.status} after {r.steps_done} steps; final train loss {_fmt(r.final_train_loss)}, "
                      f"val loss {_fmt(r.final_val_loss)}{extra}\nrun store {r.store} (run id {r.run_id})")
        return 0 if r.status != "diverged" or not args.fail_on_divergence else 1
    if not cfg.out_dir:
        cfg.out_dir = str(Path(args.out) / cfg.run_name)
    cfg.validate()
    r = _train_with_progress(cfg, console, cfg.run_name, resume=args.resume)
    console.print(
        f"{cfg.run_name}: {r.status} after {r.steps_done} steps; final train loss {_fmt(r.final_train_loss)}, "
        f"val loss {_fmt(r.final_val_loss)}, max attention logit {_fmt(r.max_attn_logit, 1)}\n"
        f"run dir {r.run_dir}; run store {r.store} (run id {r.run_id})"
    )
    return 0 if r.status != "diverged" or not args.fail_on_divergence else 1


def cmd_runs(args) -> int:
    from rich.table import Table

    from seismo.store import RunStore

    path = Path(args.store)
    if not path.exists():
        raise CLIError(f"--store: no run store at {path} (run `seismo demo` or `seismo train` first)")
    with RunStore(path) as store:
        runs = store.runs()
    table = Table(title=str(path))
    for col in ("id", "name", "created", "status", "steps", "final val loss"):
        table.add_column(col)
    for r in runs:
        table.add_row(str(r.run_id), r.name, r.created_at[:19].replace("T", " "), r.status,
                      str(r.meta.get("steps_done", "")), _fmt(r.meta.get("final_val_loss", math.nan)))
    _console().print(table)
    return 0


def cmd_sweep(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.table import Table

    from seismo.proxy.config import apply_overrides  # noqa: F401  (typed overrides inside expand)
    from seismo.proxy.sweep import expand, load_sweep_file, load_sweep_results, run_sweep, summarize_sweep
    from seismo.proxy.sweep_presets import get_sweep_preset

    console = _console()
    if args.sweep.endswith(".toml"):
        sweep = load_sweep_file(args.sweep)
    else:
        sweep = get_sweep_preset(args.sweep, quick=args.quick)
    sweep.overrides = list(sweep.overrides) + list(args.set or [])
    if args.workers is not None and args.workers < 1:
        raise CLIError(f"--workers: must be >= 1, got {args.workers}")
    store_path = Path(args.out) / "seismo.sqlite"
    trials = expand(sweep)  # validates every trial's config before anything runs
    console.print(f"[bold]sweep {sweep.name}[/bold]: {len(trials)} trials "
                  f"({len(sweep.interventions)} interventions x {len(sweep.sizes)} sizes x {len(sweep.lrs)} lrs x {len(sweep.seeds)} seeds), "
                  f"backend {args.backend}, store {store_path}")
    with Progress(TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[running]} running"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console) as progress:
        task = progress.add_task("sweep", total=len(trials), running=0)

        def on_progress(done, total, running, trial):
            progress.update(task, completed=done, running=running)

        run_sweep(sweep, store_path, workers=args.workers, backend=args.backend, ray_address=args.ray_address, on_progress=on_progress)
    rows = load_sweep_results(store_path, sweep.name, keys={t.key for t in trials})  # this grid only, not older runs of the name
    summary = summarize_sweep(rows, sweep.name)
    table = Table(title=f"{sweep.name}: LR sensitivity (Wortsman et al. 2023) per intervention and size")
    for col in ("intervention", "size", "params", "LR sensitivity", "best lr", "diverged", f"max attn logit @ lr {max(sweep.lrs):g}"):
        table.add_column(col, justify="left" if col in ("intervention", "size") else "right")
    top = max(sweep.lrs)
    for (iv, size), sens in sorted(summary.sensitivity.items(), key=lambda kv: (kv[0][0], summary.n_params.get(kv[0][1], 0))):
        logits = [r["max_attn_logit"] for r in rows if r["intervention"] == iv and r["size"] == size and r["lr"] == top]
        table.add_row(iv, size, f"{summary.n_params.get(size, 0):.3g}", f"{sens:.3f}", f"{summary.best_lr[(iv, size)]:g}",
                      f"{summary.divergence[(iv, size)]:.0%}", _fmt(max(logits), 1) if logits else "n/a")
    console.print(table)
    extra = [k for k in EXTRA_MEASURES if any(k in r for r in rows)]
    # full-batch sweeps (grokking, edge of stability) are judged by these measures, not by the
    # loss-vs-LR table: print their trials; for the others, on request
    if args.trials or any(k in r for r in rows for k in ("final_val_acc", "sharpness_ratio")):
        _print_trials(console, sweep.name, rows, extra)
    if args.predict:
        _print_prediction(console, summary, args.predict)
    try:
        from seismo.report.sweep_plots import plot_sweep, plot_trial_curves

        paths = plot_sweep(summary, Path(args.out) / f"sweep-{sweep.name}")
        paths += plot_trial_curves(store_path, rows, Path(args.out) / f"sweep-{sweep.name}")
        console.print("Plots:\n" + "\n".join(f"  {p}" for p in paths))
    except ImportError as exc:
        console.print(f"Plots skipped: {exc}")
    return 0


# per-trial measure -> column header (seismo.proxy.measures.trial_measures)
EXTRA_MEASURES = {"final_val_acc": "test acc", "grok_step": "grok step", "max_softmax_collapse": "max SC",
                  "sharpness_ratio": "sharp/thr", "max_sharpness_ratio": "max sharp/thr"}


def _print_trials(console, name: str, rows: list[dict], extra: list[str]) -> None:
    """One line per trial: its losses and the measures beyond the loss it recorded."""
    from rich.table import Table

    table = Table(title=f"{name}: trials")
    cols = ["intervention", "size", "lr", "status", "train loss", "val loss"] + [EXTRA_MEASURES[k] for k in extra]
    for col in cols:
        table.add_column(col, justify="left" if col in ("intervention", "size", "status") else "right",
                         overflow="fold", no_wrap=col == "intervention")
    for r in sorted(rows, key=lambda r: (r["intervention"], r.get("n_params") or 0, r["lr"], r.get("seed", 0))):
        cells = [r["intervention"], r["size"], f"{r['lr']:g}", r["status"], _fmt(r.get("final_train_loss")), _fmt(r.get("final_val_loss"))]
        for k in extra:
            v = r.get(k)
            cells.append("never" if v is None and k == "grok_step" else str(v) if isinstance(v, int) else _fmt(v))
        table.add_row(*cells)
    console.print(table)


def _print_prediction(console, summary, target: str) -> None:
    from seismo.proxy.measures import predict_unstable_lrs

    threshold = 1e3  # the attention_logit_growth detector's failure threshold
    base = sorted({r["intervention"] for r in summary.rows})[0]
    base = "baseline" if any(r["intervention"] == "baseline" for r in summary.rows) else base
    sized = [r for r in summary.rows if r["intervention"] == base and r["size"] == target and r.get("n_params")]
    if sized:
        n_target = float(sized[0]["n_params"])
    else:
        try:
            n_target = float(target)
        except ValueError:
            raise CLIError(f"--predict: {target!r} is neither a size of this sweep ({', '.join(summary.n_params)}) nor a parameter count") from None
    table: dict[float, dict[float, float]] = {}
    for r in summary.rows:
        if r["intervention"] == base and r.get("n_params") and math.isfinite(r.get("max_attn_logit", math.nan)):
            table.setdefault(float(r["lr"]), {})[float(r["n_params"])] = float(r["max_attn_logit"])
    pred = predict_unstable_lrs(table, n_target, threshold)
    if not pred:
        raise CLIError(f"--predict: need at least two sizes smaller than {target} in the sweep to fit a trend")
    console.print(f"\nPrediction for {target} ({n_target:.3g} params, {base}) from smaller sizes: max attention logit by power-law fit in size")
    for lr, (p, unstable) in pred.items():
        observed = table.get(lr, {}).get(n_target)
        obs = f"observed {_fmt(observed, 1)} ({'unstable' if observed >= threshold else 'stable'})" if observed is not None else "not run"
        console.print(f"  lr {lr:g}: predicted {_fmt(p, 1)} -> {'UNSTABLE' if unstable else 'stable'}; {obs}")
    first = next((lr for lr, (_, u) in pred.items() if u), None)
    console.print(f"  predicted lowest unstable lr: {first:g}" if first is not None else "  no lr predicted unstable")


def cmd_presets(args) -> int:
    from seismo.proxy.presets import PRESETS

    console = _console()
    for name in sorted(PRESETS):
        doc = (PRESETS[name].__doc__ or "").strip().splitlines()[0]
        console.print(f"[bold]{name}[/bold]  {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seismo", description="See, explain and fix training instabilities.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train TinyGPT unstable vs stabilized and compare (about 3 minutes on 2 CPU cores)")
    d.add_argument("--out", default=DEFAULT_RUNS_DIR, help="directory for runs, plot and run store (default: runs)")
    d.add_argument("--steps", type=int, default=0, help="override the number of steps (quick look)")
    d.set_defaults(fn=cmd_demo)

    t = sub.add_parser("train", help="train a proxy model from a preset")
    t.add_argument("--preset", default="baseline", help="preset name (see `seismo presets`)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. optim.lr=3e-3 (repeatable)")
    t.add_argument("--name", default="", help="run name")
    t.add_argument("--out", default=DEFAULT_RUNS_DIR, help="directory for runs and the run store")
    t.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    t.add_argument("--fail-on-divergence", action="store_true", help="exit with status 1 if the run diverges")
    t.set_defaults(fn=cmd_train)

    r = sub.add_parser("runs", help="list the runs in a run store")
    r.add_argument("--store", default=f"{DEFAULT_RUNS_DIR}/seismo.sqlite")
    r.set_defaults(fn=cmd_runs)

    dg = sub.add_parser("diagnose", help="explain what went wrong in a stored run and what to change")
    dg.add_argument("run", help="run id or name")
    dg.add_argument("--store", default=f"{DEFAULT_RUNS_DIR}/seismo.sqlite")
    dg.add_argument("--json", action="store_true", help="machine-readable output")
    dg.add_argument("--stored-events", action="store_true", help="use the events recorded during the run instead of replaying the signals")
    dg.add_argument("--max-events", type=int, default=20)
    dg.set_defaults(fn=cmd_diagnose)

    sw = sub.add_parser("sweep", help="lr x size x intervention sweep with LR sensitivity (resumable)")
    sw.add_argument("sweep", help="a sweep preset name (qk_layernorm, z_loss, warmup, independent_wd, mup, sigma_reparam, seqlen_warmup, spam, grokking, edge_of_stability) or a .toml file")
    sw.add_argument("--quick", action="store_true", help="the preset's small variant (about 2 minutes)")
    sw.add_argument("--trials", action="store_true", help="also print one line per trial with its measures (automatic for grokking and edge_of_stability)")
    sw.add_argument("--workers", type=int, default=None, help="parallel trials (default: number of cores)")
    sw.add_argument("--backend", choices=("local", "ray"), default="local")
    sw.add_argument("--ray-address", default=None, help="connect to an existing Ray cluster (default: start a local one)")
    sw.add_argument("--set", action="append", metavar="KEY=VALUE", help="override every trial's config")
    sw.add_argument("--predict", metavar="SIZE", help="predict from smaller sizes whether SIZE (a size name or parameter count) becomes unstable")
    sw.add_argument("--out", default=DEFAULT_RUNS_DIR)
    sw.set_defaults(fn=cmd_sweep)

    ps = sub.add_parser("presets", help="list training presets")
    ps.set_defaults(fn=cmd_presets)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from seismo.errors import ConfigError
    from seismo.store import StoreError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, StoreError, CLIError) as exc:
        print(f"seismo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("seismo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
