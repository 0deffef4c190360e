"""What every ``seismo`` subcommand shares: the :class:`Subcommand` base, :class:`CLIError`, the
console, number formatting and output-directory checks.

User text (run names, config values, event messages, paths) is never rich markup: print it
through :func:`esc` (``rich.markup.escape``) or as a ``rich.text.Text`` cell.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

__all__ = ["CLIError", "Subcommand", "DEFAULT_RUNS_DIR", "DEFAULT_STORE", "console", "esc", "fmt", "ensure_directory", "existing_store"]

DEFAULT_RUNS_DIR = "runs"
DEFAULT_STORE = f"{DEFAULT_RUNS_DIR}/seismo.sqlite"


class CLIError(Exception):
    """Bad command-line input: printed as ``seismo: error: <message>`` (one line), exit status 2."""


class Subcommand:
    """One ``seismo`` subcommand (torchtune's ``_cli`` shape).

    A subclass sets ``name`` and ``help``, adds its arguments in :meth:`add_arguments` and does its
    work in :meth:`run`, returning the exit status. :meth:`create` registers it with the top-level
    parser; ``seismo.cli.SUBCOMMANDS`` lists the classes.
    """

    name: str = ""
    help: str = ""
    description: str | None = None

    @classmethod
    def create(cls, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        command = cls()
        parser = subparsers.add_parser(cls.name, help=cls.help, description=cls.description or cls.help)
        command.add_arguments(parser)
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                            help="show the full traceback of an error (or set SEISMO_DEBUG=1)")
        parser.set_defaults(subcommand_run=command.run)
        return parser

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add this subcommand's arguments to ``parser``."""

    def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError


def console() -> Console:
    """A rich console on stdout. Rich wraps tables at 80 columns when the output is not a terminal
    (a log file, CI): give them room unless the user set COLUMNS."""
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(highlight=False, width=140 if wide else None)


def esc(value: object) -> str:
    """``str(value)`` escaped for rich markup: ``[red]x`` prints as ``[red]x``, ``[/]`` cannot crash."""
    return escape(str(value))


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for a table cell: ``n/a`` for missing or NaN, scientific from 1e4 on."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if abs(x) >= 1e4:
        return f"{x:.2e}"
    return f"{x:.{digits}f}" if abs(x) < 100 else f"{x:.1f}"


def ensure_directory(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create ``path`` (and its parents) as a directory, or raise :class:`CLIError` naming ``flag``
    when it is a file or cannot be created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CLIError(f"{flag}: {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"{flag}: cannot create the directory {path}: {exc.strerror or exc}") from None
    return path


def check_directory(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Like :func:`ensure_directory` but creates nothing: refuse a ``path`` that is a file or sits
    below one, so that a run fails before it starts rather than when it first writes."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise CLIError(f"{flag}: {p} is a file, not a directory")
            if not os.access(p, os.W_OK | os.X_OK):
                raise CLIError(f"{flag}: {p} is not writable")
            break
    return path


def existing_store(path: str | os.PathLike, flag: str = "--store") -> Path:
    """``path`` if a run store file is there; reading never creates one."""
    path = Path(path)
    if not path.exists():
        raise CLIError(f"{flag}: no run store at {path} (run `seismo demo` or `seismo train` first)")
    if path.is_dir():
        raise CLIError(f"{flag}: {path} is a directory; give the seismo.sqlite file in it")
    return path
