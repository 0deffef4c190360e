"""``seismo train`` through ``seismo.cli.main``: the run, its store, resume, and bad input.

Good input trains and writes a run store; bad input exits with status 2 and one line on stderr
that names the offending field, never a traceback.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from seismo.cli import main
from seismo.report import load_run
from seismo.store import RunStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
def test_bad_train_input_is_one_line_naming_the_field(argv, field, tmp_path, capsys, one_error_line):
    out = tmp_path / "runs"
    code = main(["train", *argv, "--out", str(out)])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    assert re.search(rf"(^|\W){re.escape(field)}(\W|$)", line), line
    assert not out.exists()  # nothing was started


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


def test_checkpoint_every_and_resume_through_the_cli(tmp_path, capsys):
    """checkpoint_every needs a run directory: the CLI gives it one before validating the config."""
    out = tmp_path / "runs"
    common = ["train", "--preset", "tiny", "--set", "steps=4", "--set", "checkpoint_every=2", "--set", "monitor=none",
              "--out", str(out), "--name", "ck"]
    assert main([*common, "--set", "stop_at=3"]) == 0, capsys.readouterr().err
    assert (out / "ck" / "checkpoint.pt").is_file()
    assert main([*common, "--resume"]) == 0
    assert "ck: completed after 4 steps" in capsys.readouterr().out


def test_resume_without_a_checkpoint_is_an_error_and_resume_or_start_starts(tmp_path, capsys, one_error_line):
    out = tmp_path / "runs"
    common = ["train", "--preset", "tiny", "--set", "steps=3", "--set", "monitor=none", "--out", str(out), "--name", "fresh"]
    assert main([*common, "--resume"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--resume: no checkpoint at" in line and "checkpoint.pt" in line
    assert not (out / "fresh").exists()  # refused before anything was written
    assert main([*common, "--resume-or-start"]) == 0
    assert "fresh: completed after 3 steps" in capsys.readouterr().out


def test_cli_trains_a_full_batch_preset_into_the_store(tmp_path, capsys, one_error_line):
    out = tmp_path / "runs"
    assert main(["train", "--preset", "eos_mlp", "--set", "steps=30", "--set", "lr=0.2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    run = load_run(out / "seismo.sqlite", "eos-mlp")
    steps, eig = run.series("hessian/max_eig")
    assert steps.tolist() == [0, 10, 20] and "completed after 30 steps" in text
    ratio = float(np.median((eig / (2 / 0.2))[1:]))  # the second half of the three probes: steps 10 and 20
    assert f"sharpness_ratio {ratio:.3f}" in text
    assert main(["train", "--preset", "eos_mlp", "--resume", "--out", str(out)]) == 2
    assert "no checkpoints" in one_error_line(capsys.readouterr().err)
