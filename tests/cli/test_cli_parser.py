"""The parser: every subcommand registered once, its docstring and the README list them all."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import seismo.cli
from seismo.cli import SUBCOMMANDS, build_parser, main
from seismo.proxy.presets import PRESETS

README = Path(__file__).resolve().parents[2] / "README.md"


def _command_names() -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return list(sub.choices)


def test_every_subcommand_is_registered_once_and_documented():
    names = _command_names()
    assert names == [c.name for c in SUBCOMMANDS]
    assert len(set(names)) == len(names)
    assert {"demo", "train", "sweep", "runs", "diagnose", "presets"} <= set(names)
    listed = re.findall(r"``seismo (\w+)``", seismo.cli.__doc__)
    assert sorted(listed) == sorted(names)


def test_readme_command_table_lists_every_command():
    text = README.read_text()
    section = text[text.index("## Command line"):]
    section = section[: section.find("\n## ", 1)]
    for name in _command_names():
        assert re.search(rf"`seismo {name}\b", section), name


@pytest.mark.parametrize("name", ["demo", "train", "sweep", "runs", "diagnose", "presets"])
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert f"usage: seismo {name}" in capsys.readouterr().out


def test_presets_lists_every_preset(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in PRESETS:
        assert re.search(rf"^{name}\s", out, re.M), name
