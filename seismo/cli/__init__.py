"""The ``seismo`` command line.

Commands (one module each in this package):

* ``seismo demo``      TinyGPT at a learning rate ten times too high, without and with qk-layernorm + z-loss
* ``seismo train``     train a proxy model from a preset (``--preset``, ``--set key=value``, ``--name``, ``--resume``)
* ``seismo sweep``     an lr x size x intervention grid with LR sensitivity and scaling predictions (resumable)
* ``seismo runs``      list the runs in a run store
* ``seismo diagnose``  explain what went wrong in a stored run and what to change
* ``seismo import``    bring a run recorded elsewhere (CSV, JSONL, TensorBoard, W&B export) into the store
* ``seismo presets``   list the training presets
* ``seismo report``    a self-contained HTML report of runs (overlaid) or of a sweep
* ``seismo watch``     a live, read-only terminal view of a run another process is writing
* ``seismo autopsy``   replay the steps before a loss spike several ways and say what caused it

Every command reports bad input as one line naming the field, ``seismo: error: ...``, with exit
status 2; a failure at run time is one line with exit status 1. ``--debug`` (or
``SEISMO_DEBUG=1``) shows the traceback instead.

Adding a command: a module with a :class:`~seismo.cli._common.Subcommand` subclass (see
``presets.py``, the smallest), and its class in :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from seismo.cli._common import CLIError, Subcommand
from seismo.cli.autopsy_cmd import Autopsy
from seismo.cli.demo import Demo
from seismo.cli.diagnose import Diagnose
from seismo.cli.import_cmd import Import
from seismo.cli.presets import Presets
from seismo.cli.report_cmd import Report
from seismo.cli.runs import Runs
from seismo.cli.sweep import Sweep
from seismo.cli.train import Train
from seismo.cli.watch_cmd import Watch
from seismo.errors import ConfigError
from seismo.store import StoreError

__all__ = ["main", "build_parser", "SUBCOMMANDS", "Subcommand", "CLIError"]

SUBCOMMANDS: tuple[type[Subcommand], ...] = (Demo, Train, Sweep, Runs, Diagnose, Import, Presets, Report, Watch, Autopsy)

_INPUT_ERRORS = (ConfigError, StoreError, CLIError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seismo", description="See, explain and fix training instabilities.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (or set SEISMO_DEBUG=1)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(c.name for c in SUBCOMMANDS) + "}")
    for command in SUBCOMMANDS:
        command.create(subparsers)
    return parser


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``seismo ARGV``; returns the exit status (0 ok, 1 run-time failure, 2 bad input, 130 Ctrl-C)."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("SEISMO_DEBUG", "").strip() not in ("", "0")
    try:
        return args.subcommand_run(args)
    except _INPUT_ERRORS as exc:
        if debug:
            raise
        print(f"seismo: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("seismo: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a run-time failure is one line (the run is already stored as failed)
        if debug:
            raise
        print(f"seismo: error: {type(exc).__name__}: {_one_line(exc)} (--debug or SEISMO_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
