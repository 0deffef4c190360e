"""``seismo demo``: TinyGPT at a learning rate ten times too high, without and with qk-layernorm + z-loss."""

from __future__ import annotations

import argparse
import math
import time
from contextlib import ExitStack
from pathlib import Path

from rich.table import Table
from rich.text import Text

from seismo.cli._common import DEFAULT_RUNS_DIR, Subcommand, console, ensure_directory, esc, fmt
from seismo.cli._training import preflight, train_with_progress
from seismo.diagnose.engine import summarize
from seismo.errors import ConfigError
from seismo.proxy.presets import demo_stable, demo_unstable
from seismo.proxy.run_dirs import RunDirLock, run_dir_name
from seismo.report import write_report
from seismo.report.plots import plot_runs

__all__ = ["Demo"]

_MAX_SUFFIX = 100


def _claim(stack: ExitStack, cfg, out: Path) -> None:
    """Point ``cfg`` at a run directory under ``out`` that no other process is writing (two demos
    started in the same second get ``-2``, ``-3``, ... instead of sharing one) and lock it."""
    base = cfg.run_name
    for i in range(1, _MAX_SUFFIX + 1):
        name = base if i == 1 else f"{base}-{i}"
        lock = RunDirLock(out / run_dir_name(name), name)
        try:
            stack.enter_context(lock)
        except ConfigError:
            continue
        cfg.run_name, cfg.out_dir = name, str(lock.path)
        return
    raise ConfigError(f"--out: {_MAX_SUFFIX} demo runs named {base}* are being written in {out} at once")


class Demo(Subcommand):
    name = "demo"
    help = "train TinyGPT unstable vs stabilized and compare (about 3 minutes on 2 CPU cores)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--out", default=DEFAULT_RUNS_DIR, help="directory for runs, plot and run store (default: runs)")
        parser.add_argument("--steps", type=int, default=0, help="override the number of steps (quick look)")

    def run(self, args: argparse.Namespace) -> int:
        if args.steps < 0:
            raise ConfigError(f"--steps: must be >= 0 (0 = the preset's), got {args.steps}")
        con = console()
        out = Path(args.out)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        runs = [("unstable", demo_unstable()), ("qk-norm + z-loss", demo_stable())]
        for _, cfg in runs:
            cfg.run_name = f"{cfg.run_name}-{stamp}"
            cfg.store = str(out / "seismo.sqlite")
            if args.steps:
                cfg.steps = args.steps
                cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, max(1, args.steps // 6))
                cfg.eval_every = 0
            preflight(cfg, out)
        ensure_directory(out, "--out")
        con.print(
            "[bold]seismo demo[/bold]: TinyGPT (d=128, 2 layers, 4 heads) on the Python standard library's "
            "source, bytes as tokens.\nFirst at a learning rate ten times too high; then the same run with "
            "qk-layernorm and z-loss (Wortsman et al. 2023).\n"
        )
        results = []
        with ExitStack() as stack:
            for label, cfg in runs:
                _claim(stack, cfg, out)
                results.append((label, train_with_progress(cfg, con, label)))
        self._print_table(con, results)
        try:
            png = esc(plot_runs({label: r.history for label, r in results}, out / f"demo-{stamp}.png",
                                title="seismo demo: TinyGPT at lr 0.1, without and with qk-layernorm + z-loss"))
        except ImportError as exc:  # matplotlib is the optional extra seismo[plot]
            png = f"skipped ({esc(exc)})"
        (_, ru), (_, rs) = results
        try:
            report = esc(write_report(ru.store, [ru.run_id, rs.run_id], out / f"demo-{stamp}.html"))
        except ImportError as exc:  # matplotlib is the optional extra seismo[plot]
            report = f"skipped ({esc(exc)})"
        ratio = ru.max_attn_logit / rs.max_attn_logit if rs.max_attn_logit and math.isfinite(rs.max_attn_logit) else math.nan
        con.print(
            f"\nWithout qk-layernorm the attention logits grew to {fmt(ru.max_attn_logit, 1)} "
            f"({ratio:,.0f}x the stabilized run): softmax attention saturates to one-hot and the loss "
            f"stalls at {fmt(ru.final_val_loss)} vs {fmt(rs.final_val_loss)}.\n"
        )
        d = summarize(ru.events, ru.run_dir or "unstable")
        if d.cause_kind:
            first_warn = min((e.step for e in ru.events if e.kind == "attention_logit_growth"), default=None)
            con.print(f"Diagnosis of the unstable run: {esc(d.cause)}.")
            if first_warn is not None:
                con.print(f"  first attention_logit_growth warning at step {first_warn}")
            for rec in d.recommendations[:2]:
                con.print(f"  recommended: {esc(rec['name'])} ({esc(rec['how'])}) {esc('[' + rec['paper'] + ']')}")
            con.print()
        con.print(
            "Outputs:\n"
            f"  runs:      {esc(ru.run_dir)}\n             {esc(rs.run_dir)}\n"
            f"  plot:      {png}\n"
            f"  report:    {report}\n"
            f"  run store: {esc(ru.store)}\n"
            f"Next: [bold]seismo runs --store {esc(ru.store)}[/bold]\n"
            f"      [bold]seismo diagnose {ru.run_id} --store {esc(ru.store)}[/bold]"
        )
        return 0

    @staticmethod
    def _print_table(con, results) -> None:
        table = Table(title="TinyGPT, same data, same seed, lr 0.1")
        for col in ("run", "final train loss", "final val loss", "max attention logit", "attention events", "status"):
            table.add_column(col, justify="left" if col == "run" else "right")
        for label, r in results:
            n_attn = sum(1 for e in r.events if e.kind.startswith("attention"))
            status = Text(r.status, style="red" if r.status == "diverged" else "")
            table.add_row(Text(label), fmt(r.final_train_loss), fmt(r.final_val_loss), fmt(r.max_attn_logit, 1), str(n_attn), status)
        con.print()
        con.print(table)
