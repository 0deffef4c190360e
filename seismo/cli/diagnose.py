"""``seismo diagnose RUN``: what went wrong in a stored run, and what to change."""

from __future__ import annotations

import argparse
import json

from rich.table import Table
from rich.text import Text

from seismo.cli._common import DEFAULT_STORE, Subcommand, console, esc, existing_store
from seismo.diagnose.engine import diagnose_run
from seismo.proxy.batch_text import spike_batches
from seismo.store import RunStore

__all__ = ["Diagnose"]


class Diagnose(Subcommand):
    name = "diagnose"
    help = "explain what went wrong in a stored run and what to change"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("run", help="run id or name")
        parser.add_argument("--store", default=DEFAULT_STORE, help=f"the run store (default: {DEFAULT_STORE})")
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        parser.add_argument("--stored-events", action="store_true",
                            help="use the events recorded during the run instead of replaying the signals")
        parser.add_argument("--compare", nargs="+", default=[], metavar="OTHER",
                            help="other runs (ids or names) that saw the same data in the same order: a loss spike "
                                 "at the same step (+-1) in any of them is attributed to the data")
        parser.add_argument("--max-events", type=int, default=20, help="rows of the timeline (default: 20)")

    def run(self, args: argparse.Namespace) -> int:
        path = existing_store(args.store)
        d = diagnose_run(str(path), args.run, replay=not args.stored_events, compare=args.compare)
        if args.json:
            print(json.dumps(d.to_dict(), indent=2, default=str))
            return 0
        con = console()
        con.print(f"[bold]Diagnosis of run {esc(d.run)}[/bold]")
        con.print(f"Likely cause: {esc(d.cause)}.")
        if d.events:
            table = Table(title="timeline (first events; grouped by kind and module)")
            for col in ("step", "severity", "kind", "module", "message"):
                table.add_column(col)
            seen: dict[tuple, int] = {}
            for e in d.events:
                key = (e.kind, e.module, e.severity)
                seen[key] = seen.get(key, 0) + 1
                if seen[key] == 1 and len(table.rows) < args.max_events:
                    table.add_row(str(e.step), Text(e.severity), Text(e.kind), Text(e.module or "-"), Text(e.message))
            con.print(table)
        for shared in d.shared_spikes:
            con.print(f"Data-caused: the {esc(shared['kind'])} at step {shared['step']} also happened in "
                      f"{esc(', '.join(shared['runs']))} (same data order): a batch, not this run's state.")
        with RunStore(path) as store:
            batches = spike_batches(store, args.run, d.events)
        for event, seqs in batches:
            con.print(f"Batch of the loss spike at step {event.step} ({esc(event.severity)}), highest-loss sequences first:")
            if isinstance(seqs, str):
                con.print(f"  (cannot show its text: {esc(seqs)})")
            for s in seqs[:4] if not isinstance(seqs, str) else ():
                ident = "poisoned (random tokens)" if s.id < 0 else f"offset {s.id}"
                loss = "" if s.loss is None else f", loss {s.loss:.2f}"
                con.print(f"  #{s.position} {esc(ident)}{loss}: {esc(s.text)}")
        if d.modules:
            con.print("Modules involved: " + ", ".join(f"{esc(m)} ({n})" for m, n in list(d.modules.items())[:8]))
        if d.recommendations:
            con.print("Recommended changes, most likely to help first:")
            for i, r in enumerate(d.recommendations[:6], 1):
                call = f" `{esc(r['call'])}`" if r["call"] else ""
                con.print(f"  {i}. {esc(r['name'])}: {esc(r['how'])}{call}  {esc('[' + r['paper'] + ']')}  (for {esc(r['for'])})")
        return 0
