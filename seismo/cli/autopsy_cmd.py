"""``seismo autopsy RUN --step N``: replay the steps before a loss spike several ways and say where it comes from."""

from __future__ import annotations

import argparse
import json
import os

from rich.table import Table
from rich.text import Text

from seismo.cli._common import DEFAULT_STORE, CLIError, Subcommand, console, esc, existing_store, fmt
from seismo.proxy.autopsy import BACKENDS, DEFAULT_WINDOW, autopsy_run

__all__ = ["Autopsy"]


class Autopsy(Subcommand):
    name = "autopsy"
    help = "replay the steps before a loss spike (other data, lower LR, mitigations) and say what caused it"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("run", help="run id or name (a proxy-lab run trained with checkpoint_every)")
        parser.add_argument("--step", type=int, required=True, help="the step of the spike (its peak loss)")
        parser.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                            help=f"replay from the newest checkpoint at least this many steps before the spike (default: {DEFAULT_WINDOW})")
        parser.add_argument("--after", type=int, default=None,
                            help="steps replayed after the spike, to see the recovery (default: --window)")
        parser.add_argument("--skip", type=int, default=3,
                            help="batches dropped by the 'skip spike batches' replay, ending at --step (default: 3)")
        parser.add_argument("--store", default=DEFAULT_STORE, help=f"the run store (default: {DEFAULT_STORE})")
        parser.add_argument("--run-dir", default=None, help="the run's directory with its checkpoints (default: from its config)")
        parser.add_argument("--workers", type=int, default=None, help="replays run in parallel (default: the number of CPUs)")
        parser.add_argument("--backend", choices=BACKENDS, default="local", help="local process pool or Ray (pip install 'seismo[ray]')")
        parser.add_argument("--json", action="store_true", help="machine-readable output")

    def run(self, args: argparse.Namespace) -> int:
        path = existing_store(args.store)
        for flag in ("step", "window", "skip"):
            if getattr(args, flag) < (1 if flag in ("window", "skip") else 0):
                raise CLIError(f"--{flag}: must be {'>= 1' if flag != 'step' else '>= 0'}, got {getattr(args, flag)}")
        if args.after is not None and args.after < 0:
            raise CLIError(f"--after: must be >= 0, got {args.after}")
        workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
        if workers < 1:
            raise CLIError(f"--workers: must be >= 1, got {workers}")
        con = console()
        with con.status(f"autopsy of {esc(args.run)} at step {args.step}: replaying"):
            result = autopsy_run(str(path), args.run, args.step, window=args.window, after=args.after, skip=args.skip,
                                 run_dir=args.run_dir, workers=workers, backend=args.backend)
        v = result.verdict
        if args.json:
            print(json.dumps(dict(v.to_dict(), summary_run_id=result.summary_run_id, run_ids=result.run_ids), indent=2, default=str))
            return 0
        table = Table(title=f"autopsy of {esc(args.run)}: spike at step {v.spike}, replayed from the checkpoint at step {v.start} "
                            f"to step {v.stop - 1}")
        attn = any("attn/logit_max" in r.signal_final for r in v.rows)
        numeric = ("peak loss", "at step", "steps to recover", "final loss", "final attn logit", "run id")
        cols = ["replay", "peak loss", "at step", "steps to recover", "final loss"] + (["final attn logit"] if attn else [])
        for col in cols + ["effect", "signals that moved", "run id"]:
            table.add_column(col, justify="right" if col in numeric else "left")
        for r in v.rows:
            logit = [fmt(r.signal_final.get("attn/logit_max"), 1)] if attn else []
            table.add_row(Text(r.name), fmt(r.peak_loss), "-" if r.peak_step is None else str(r.peak_step),
                          "-" if r.steps_to_recover is None else str(r.steps_to_recover), fmt(r.final_loss), *logit,
                          Text(r.effect + (f" ({r.status})" if r.status != "completed" else "")), Text(", ".join(r.moved) or "-"),
                          str(r.run_id) if r.run_id is not None else "-")
        con.print(table)
        con.print(f"Same data: {esc(v.reproduced)}.")
        con.print(f"[bold]Verdict[/bold] ({esc(v.cause)}): {esc(v.sentence)}.")
        con.print(f"Stored in {esc(result.store)}: the replays as runs {esc(args.run)}/autopsy@{v.spike}/<replay>, "
                  f"the table as run {result.summary_run_id}.")
        failed = [r for r in v.rows if r.status == "failed"]
        for r in failed:
            con.print(f"[red]replay {esc(r.name)} failed:[/red] {esc(r.error)}")
        return 0
