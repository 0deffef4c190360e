"""``seismo runs``: a missing store is one line, reading never creates one."""

from __future__ import annotations

from seismo.cli import main


def test_runs_with_missing_store_exits_2(tmp_path, capsys, one_error_line):
    code = main(["runs", "--store", str(tmp_path / "missing.sqlite")])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    assert "--store" in line and "missing.sqlite" in line
    assert not (tmp_path / "missing.sqlite").exists()  # reading does not create a store


def test_runs_on_a_directory_names_the_flag(tmp_path, capsys, one_error_line):
    assert main(["runs", "--store", str(tmp_path)]) == 2
    assert "--store" in one_error_line(capsys.readouterr().err)
