"""``seismo import PATH``: bring a run recorded elsewhere (CSV, JSON lines, TensorBoard, W&B export) into the store."""

from __future__ import annotations

import argparse

from seismo.cli._common import DEFAULT_STORE, Subcommand, console, esc
from seismo.importers import FORMATS, read_run
from seismo.importers.importer import parse_mapping, store_run

__all__ = ["Import"]


class Import(Subcommand):
    name = "import"
    help = "import a run from a CSV / JSONL file, TensorBoard event files or a W&B history export"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("path", help="the file (or, for TensorBoard, the log directory)")
        parser.add_argument("--format", choices=FORMATS, help="the file's format (default: from its name)")
        parser.add_argument("--map", action="append", default=[], metavar="NAME=COLUMN",
                            help="store COLUMN as seismo's signal NAME, e.g. --map loss=train/lm_loss "
                                 "(repeatable; step=COLUMN names the step column)")
        parser.add_argument("--run", help="the run's name (default: the file name)")
        parser.add_argument("--store", default=DEFAULT_STORE, help=f"the run store (default: {DEFAULT_STORE})")

    def run(self, args: argparse.Namespace) -> int:
        mapping = parse_mapping(args.map)
        run = read_run(args.path, args.format, mapping)  # read (and fail) before touching the store
        run_id = store_run(run, run_name=args.run, store=args.store)
        con = console()
        con.print(f"imported {esc(run.path)} ({run.format}) as run {run_id} in {esc(args.store)}: "
                  f"{len(run.metrics)} signals, up to {run.steps} steps")
        con.print(f"next: seismo diagnose {run_id} --store {esc(args.store)}")
        return 0
