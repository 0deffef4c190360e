"""``seismo presets``: list the training presets (``seismo train --preset NAME``)."""

from __future__ import annotations

import argparse

from seismo.cli._common import Subcommand, console, esc
from seismo.proxy.presets import PRESETS

__all__ = ["Presets"]


class Presets(Subcommand):
    name = "presets"
    help = "list training presets"

    def run(self, args: argparse.Namespace) -> int:
        con = console()
        for name in sorted(PRESETS):
            doc = (PRESETS[name].__doc__ or "").strip().splitlines()[0]
            con.print(f"[bold]{esc(name)}[/bold]  {esc(doc)}")
        return 0
