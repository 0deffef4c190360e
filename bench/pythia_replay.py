"""Replay speed: the batch replay against the streaming detectors on real loss logs, same run.

    python bench/pythia_replay.py [--data ../shared/data/pythia] [--runs pythia-14m-1 pythia-70m-0]

For each log: the default detectors streamed record by record (``Diagnoser.__call__``) and
replayed in one batch (``Diagnoser.replay``); prints steps/s of each, their ratio, and checks the
two give the same events.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import cpu_model, loadavg  # noqa: E402
from pythia_data import DEFAULT_DATA, load_loss  # noqa: E402

from seismo.diagnose import Diagnoser, default_detectors  # noqa: E402
from seismo.diagnose.replay import records_of  # noqa: E402


def _key(e):
    return (e.kind, e.severity, e.step, e.module, e.message, repr(sorted(e.evidence.items())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--runs", nargs="+", default=["pythia-14m-1", "pythia-160m-5"])
    args = ap.parse_args()
    print(f"CPU: {cpu_model()}; load average {loadavg()}")
    print("| log | steps | streaming steps/s | replay steps/s | ratio | same events |")
    print("|---|---|---|---|---|---|")
    for name in args.runs:
        steps, loss = load_loss(args.data, name)
        history = {"loss": (steps, loss)}
        t0 = time.perf_counter()
        fast = Diagnoser(default_detectors())
        fast.replay(history)
        t_replay = time.perf_counter() - t0
        slow = Diagnoser(default_detectors())
        t0 = time.perf_counter()
        for step, values in records_of(history):
            slow(step, values)
        t_stream = time.perf_counter() - t0
        same = [_key(e) for e in fast.events] == [_key(e) for e in slow.events]
        n = len(loss)
        print(f"| {name} | {n:,} | {n / t_stream:,.0f} | {n / t_replay:,.0f} | {t_stream / t_replay:.1f}x | {same} ({len(fast.events)}) |")


if __name__ == "__main__":
    main()
