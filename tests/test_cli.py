"""The ``seismo`` command line, run in-process through ``seismo.cli.main``.

Good input trains and writes a run store; bad input exits with status 2 and one line on stderr
that names the offending field, never a traceback.
"""

from __future__ import annotations

import re

import pytest

from seismo.cli import main
from seismo.proxy.presets import PRESETS
from seismo.store import RunStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich tables on one line each


def test_train_tiny_preset_creates_the_store(tmp_path, capsys):
    out = tmp_path / "runs"
    code = main(["train", "--preset", "tiny", "--set", "steps=5", "--name", "smoke", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "smoke: completed after 5 steps" in captured.out
    assert (out / "seismo.sqlite").is_file()
    assert (out / "smoke" / "config.json").is_file()
    assert (out / "smoke" / "result.json").is_file()
    with RunStore(out / "seismo.sqlite") as store:
        runs = store.runs()
        assert [r.name for r in runs] == ["smoke"]
        assert runs[0].status == "completed"
        assert runs[0].config["steps"] == 5
        steps, _ = store.series(runs[0].run_id, "loss")
        assert list(steps) == [0, 1, 2, 3, 4]

    assert main(["runs", "--store", str(out / "seismo.sqlite")]) == 0
    listed = capsys.readouterr().out
    assert "smoke" in listed and "completed" in listed


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--preset", "nope"], "preset"),
        (["--preset", "tiny", "--set", "optim.lr=-1"], "optim.lr"),
        (["--preset", "tiny", "--set", "model.n_embd=30"], "model.n_embd"),
        (["--preset", "tiny", "--set", "optim.foo=1"], "optim.foo"),
        (["--preset", "tiny", "--set", "steps=abc"], "steps"),
        (["--preset", "tiny", "--set", "model.qk_norm=maybe"], "model.qk_norm"),
        (["--preset", "tiny", "--set", "steps"], "steps"),
        (["--preset", "tiny", "--set", "model=1"], "model"),
    ],
)
def test_bad_train_input_is_one_line_naming_the_field(argv, field, tmp_path, capsys):
    out = tmp_path / "runs"
    code = main(["train", *argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert re.search(rf"(^|\W){re.escape(field)}(\W|$)", lines[0]), lines[0]
    assert not (out / "seismo.sqlite").exists()  # nothing was started


def test_runs_with_missing_store_exits_2(tmp_path, capsys):
    code = main(["runs", "--store", str(tmp_path / "missing.sqlite")])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--store" in lines[0] and "missing.sqlite" in lines[0]
    assert not (tmp_path / "missing.sqlite").exists()  # reading does not create a store


def test_presets_lists_every_preset(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in PRESETS:
        assert re.search(rf"^{name}\s", out, re.M), name


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "8", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    pngs = list(out.glob("demo-*.png"))
    assert len(pngs) == 1 and pngs[0].stat().st_size > 1000
    assert pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line for line in text.splitlines() if "│" in line]
    assert any("unstable" in r for r in rows)
    assert any("qk-norm + z-loss" in r for r in rows)
    with RunStore(out / "seismo.sqlite") as store:
        names = sorted(r.name for r in store.runs())
    assert len(names) == 2
    assert names[0].startswith("demo-qknorm-zloss-") and names[1].startswith("demo-unstable-")


def test_train_stop_and_resume_matches_an_uninterrupted_run(tmp_path, capsys):
    out = str(tmp_path / "runs")
    common = ["train", "--preset", "tiny", "--set", "steps=6", "--set", "monitor=minimal", "--out", out]
    assert main([*common, "--name", "full"]) == 0
    assert main([*common, "--name", "cut", "--set", "stop_at=3"]) == 0
    assert "cut: interrupted after 3 steps" in capsys.readouterr().out
    assert main([*common, "--name", "cut", "--resume"]) == 0
    assert "cut: completed after 6 steps" in capsys.readouterr().out
    with RunStore(tmp_path / "runs" / "seismo.sqlite") as store:
        runs = {r.name: r for r in store.runs()}
        assert set(runs) == {"full", "cut"}  # the resumed run kept its stored run
        s_full, v_full = store.series(runs["full"].run_id, "loss")
        s_cut, v_cut = store.series(runs["cut"].run_id, "loss")
    assert list(s_cut) == list(s_full) == list(range(6))
    assert list(v_cut) == list(v_full)
