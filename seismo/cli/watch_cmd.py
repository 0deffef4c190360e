"""``seismo watch``: a live, read-only terminal view of a run another process is writing."""

from __future__ import annotations

import argparse

from seismo.cli._common import DEFAULT_STORE, CLIError, Subcommand, console, existing_store
from seismo.report.watch import POLL_INTERVAL_S, watch
from seismo.store import StoreError

__all__ = ["Watch"]


class Watch(Subcommand):
    name = "watch"
    help = "watch a run live (read-only): latest signals, loss sparkline, events"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("ref", nargs="?", default=None, metavar="RUN", help="run id or name (default: the newest run)")
        parser.add_argument("--store", default=DEFAULT_STORE, help=f"run store (default: {DEFAULT_STORE})")
        parser.add_argument("--once", action="store_true", help="print one frame and exit")
        parser.add_argument("--interval", type=float, default=POLL_INTERVAL_S,
                            help=f"seconds between polls, at most 1 (default: {POLL_INTERVAL_S})")

    def run(self, args: argparse.Namespace) -> int:
        if not 0 < args.interval <= 1:
            raise CLIError(f"--interval: must be in (0, 1] seconds, got {args.interval:g}")
        store = existing_store(args.store)
        try:
            watch(store, args.ref, once=args.once, interval=args.interval, console=console())
        except StoreError as exc:
            raise CLIError(f"RUN: {exc}") from None
        return 0
