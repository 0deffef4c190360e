"""Run names are data, never paths or markup (issue 16, item 1).

* The directory of a run is a safe slug of its name: ``../../escaped``, ``/abs/dir`` and ``.``
  cannot write outside ``--out`` (or into ``--out`` itself); the name is stored verbatim.
* Names printed by the CLI are escaped for rich: ``[/]`` trains, and ``seismo runs`` /
  ``seismo diagnose`` on that store still work; ``[red]x`` shows as ``[red]x``.
* Two processes never write one run directory at once (a lock, released even by kill -9).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from seismo.cli import main
from seismo.errors import ConfigError
from seismo.proxy.run_dirs import LOCK_FILE, MAX_NAME_CHARS, RunDirLock, run_dir_name
from seismo.store import RunStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["train", "--preset", "tiny", "--set", "steps=3", "--set", "eval_every=0", "--set", "monitor=minimal"]


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("SEISMO_DEBUG", raising=False)


def _h(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:8]


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


# --- the slug, by hand ------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("smoke", "smoke"),  # already safe: kept, so existing run directories keep their names
    ("run-1.v2_b", "run-1.v2_b"),
    ("../../escaped", f"_._escaped-{_h('../../escaped')}"),
    ("/abs/dir", f"_abs_dir-{_h('/abs/dir')}"),
    ("[/]", f"_-{_h('[/]')}"),
    ("[red]x", f"_red_x-{_h('[red]x')}"),
    ("a b", f"a_b-{_h('a b')}"),
    ("-rf", f"rf-{_h('-rf')}"),  # never option-like
    (".hidden", f"hidden-{_h('.hidden')}"),  # never hidden
    ("Grüße", f"Grue-{_h('Grüße')}"),  # NFKD: u-umlaut -> u; sharp s has no ASCII form and is dropped
    ("nul", f"nul-{_h('nul')}"),  # a reserved device name on Windows
])
def test_slug_hand_computed(name, expected):
    assert run_dir_name(name) == expected


def test_different_names_never_share_a_directory():
    names = ["a b", "a_b", "a/b", "a\\b", "a:b", "[a]b", "a..b", "a.b"]
    dirs = [run_dir_name(n) for n in names]
    assert len(set(dirs)) == len(names)
    for d in dirs:
        assert "/" not in d and "\\" not in d and not d.startswith((".", "-")) and ".." not in d


@pytest.mark.parametrize("name, message", [
    ("", "must not be empty"),
    ("   ", "must not be empty"),
    (".", "cannot name a directory"),
    ("..", "cannot name a directory"),
    ("-", "cannot name a directory"),
    ("x" * (MAX_NAME_CHARS + 1), f"at most {MAX_NAME_CHARS} characters"),
    ("red\x1b[31m", "control characters"),
    ("a\nb", "control characters"),
])
def test_unsafe_names_are_refused(name, message):
    with pytest.raises(ConfigError, match=message):
        run_dir_name(name, "--name")


# --- through the CLI --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../escaped", "ABS", "../", "sub/../../x"])
def test_traversal_names_write_nothing_outside_out(tmp_path, capsys, name):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    out = work / "runs"
    if name == "ABS":
        name = str(tmp_path / "abs" / "dir")
    before = _files(tmp_path)
    code = main([*TINY, "--out", str(out), "--name", name])
    assert code == 0, capsys.readouterr().err
    written = _files(tmp_path) - before
    assert written and all(out in p.parents or p == out for p in written), sorted(map(str, written))
    run_dirs = [p for p in out.iterdir() if p.is_dir()]
    assert len(run_dirs) == 1 and run_dirs[0].parent == out and run_dirs[0].name == run_dir_name(name)
    assert (run_dirs[0] / "result.json").is_file()
    with RunStore(out / "seismo.sqlite") as store:
        assert [r.name for r in store.runs()] == [name]  # stored verbatim


def test_dot_name_is_refused_and_writes_nothing(tmp_path, capsys, one_error_line):
    out = tmp_path / "runs"
    assert main([*TINY, "--out", str(out), "--name", "."]) == 2
    assert "--name" in one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_markup_names_train_list_and_diagnose_verbatim(tmp_path, capsys):
    out = tmp_path / "runs"
    store = str(out / "seismo.sqlite")
    for name in ("[/]", "[red]x"):
        assert main([*TINY, "--out", str(out), "--name", name]) == 0, capsys.readouterr().err
        text = capsys.readouterr().out
        assert f"{name}: completed after 3 steps" in text
    assert main(["runs", "--store", store]) == 0
    listed = capsys.readouterr().out
    assert "│ [/]" in listed and "│ [red]x" in listed
    assert main(["diagnose", "[/]", "--store", store]) == 0
    assert "Diagnosis of run [/] (id 1)" in capsys.readouterr().out
    assert main(["diagnose", "2", "--store", store]) == 0
    assert "Diagnosis of run [red]x (id 2)" in capsys.readouterr().out


# --- two processes, one run directory ---------------------------------------------------------

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from seismo.proxy.run_dirs import RunDirLock
    with RunDirLock(sys.argv[1], "same"):
        print("locked", flush=True)
        time.sleep(60)
""")


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_on_the_same_run_directory_is_refused(tmp_path, capsys, one_error_line):
    out = tmp_path / "runs"
    holder = _hold_lock(out / "same")
    try:
        config_before = (out / "same" / "config.json").exists()
        assert main([*TINY, "--out", str(out), "--name", "same"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "--name" in line and "another process" in line
        assert (out / "same" / "config.json").exists() == config_before  # nothing of it was overwritten
    finally:
        holder.kill()
        holder.wait()
    # the kernel drops the lock with its process, even after SIGKILL: the run can start now
    assert main([*TINY, "--out", str(out), "--name", "same"]) == 0
    assert (out / "same" / LOCK_FILE).exists()


def test_lock_in_process_is_exclusive_and_released():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        with RunDirLock(Path(d) / "r", "r") as lock:
            assert lock.held
            with pytest.raises(ConfigError, match="another process"):
                RunDirLock(Path(d) / "r", "r").acquire()  # a second open file description conflicts too
        assert not lock.held
        RunDirLock(Path(d) / "r", "r").acquire().release()


def test_two_demos_at_once_get_separate_directories(tmp_path, capsys, monkeypatch):
    """A demo whose run directory is taken writes beside it (``-2``) instead of into it."""
    import seismo.cli.demo as demo

    pytest.importorskip("matplotlib")
    monkeypatch.setattr(demo.time, "strftime", lambda fmt, *when: "20260101-000000")
    out = tmp_path / "demo"
    holder = _hold_lock(out / "demo-unstable-20260101-000000")
    try:
        assert main(["demo", "--steps", "2", "--out", str(out)]) == 0, capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert (out / "demo-unstable-20260101-000000-2" / "result.json").is_file()
    assert not (out / "demo-unstable-20260101-000000" / "result.json").exists()
