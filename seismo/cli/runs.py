"""``seismo runs``: list the runs in a run store."""

from __future__ import annotations

import argparse
import math

from rich.table import Table
from rich.text import Text

from seismo.cli._common import DEFAULT_STORE, Subcommand, console, existing_store, fmt
from seismo.store import RunStore

__all__ = ["Runs"]


class Runs(Subcommand):
    name = "runs"
    help = "list the runs in a run store"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--store", default=DEFAULT_STORE, help=f"the run store (default: {DEFAULT_STORE})")

    def run(self, args: argparse.Namespace) -> int:
        path = existing_store(args.store)
        with RunStore(path) as store:
            runs = store.runs()
        table = Table(title=Text(str(path)))
        for col in ("id", "name", "created", "status", "steps", "final val loss"):
            table.add_column(col)
        for r in runs:  # names are user text: Text cells are never parsed as markup
            table.add_row(str(r.run_id), Text(r.name), r.created_at[:19].replace("T", " "), Text(r.status),
                          str(r.meta.get("steps_done", "")), fmt(r.meta.get("final_val_loss", math.nan)))
        console().print(table)
        return 0
