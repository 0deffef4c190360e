"""``seismo report``: one self-contained HTML file for runs or a sweep (see docs/REPORT.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from seismo.cli._common import DEFAULT_STORE, CLIError, Subcommand, console, esc, existing_store
from seismo.report import write_report
from seismo.report.figures import MissingExtra
from seismo.store import StoreError

__all__ = ["Report"]


class Report(Subcommand):
    name = "report"
    help = "write a self-contained HTML report of runs (overlaid) or of a sweep"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("runs", nargs="+", metavar="RUN_OR_SWEEP", help="run ids or names (one page, overlaid), or one sweep name")
        parser.add_argument("--store", default=DEFAULT_STORE, help=f"run store (default: {DEFAULT_STORE})")
        parser.add_argument("--out", default="report.html", help="the HTML file to write (default: report.html)")
        parser.add_argument("--predict", type=float, default=None, metavar="N_PARAMS",
                            help="sweeps: predict the max attention logit at this many non-embedding parameters (default: 4x the largest)")

    def run(self, args: argparse.Namespace) -> int:
        store = existing_store(args.store)
        out = Path(args.out)
        if out.is_dir():
            raise CLIError(f"--out: {out} is a directory; give the HTML file to write")
        if args.predict is not None and not args.predict > 0:
            raise CLIError(f"--predict: must be a positive parameter count, got {args.predict:g}")
        try:
            path = write_report(store, args.runs, out, predict_params=args.predict)
        except StoreError as exc:
            raise CLIError(f"RUN_OR_SWEEP: {exc}") from None
        except MissingExtra as exc:
            raise CLIError(str(exc)) from None
        except OSError as exc:
            raise CLIError(f"--out: cannot write {out}: {exc.strerror or exc}") from None
        console().print(f"report: {esc(path)}")
        return 0
