"""``seismo sweep`` through ``seismo.cli.main``: the LR-sensitivity table, plots, the size
prediction and one-line errors. (The sweep engine itself is tested in tests/proxy/test_sweep.py.)"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from seismo.cli import main
from seismo.cli.sweep import attention_failure_threshold
from seismo.diagnose.detectors import GrowthDetector, default_detectors
from seismo.proxy.sweep import load_sweep_results
from seismo.proxy.sweep_presets import SIZES
from seismo.store import RunStore

# A training run of a fraction of a second: the quick presets' settings, smaller.
TINY_RUN = ["steps=10", "batch_size=8", "model.block_size=32", "optim.warmup_steps=2", "eval_every=0", "eval_batches=2",
            "data.max_bytes=100000", "log_every=5"]


@pytest.fixture(autouse=True, scope="module")
def _restore_threads():
    """workers=1 runs trials in this process, and ``run_trial`` sets one torch thread: restore it."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_prediction_threshold_is_the_detectors():
    """The prediction calls a size unstable where the live detector reports a failure: the same number."""
    growth = next(d for d in default_detectors() if isinstance(d, GrowthDetector) and d.kind == "attention_logit_growth")
    assert attention_failure_threshold() == growth.threshold
    # and that detector does fail at it: a logit at the threshold is critical
    events = growth.update(0, {"attn/logit_max/blocks.0.attn": growth.threshold})
    assert any(e.severity == "critical" for e in events)


def test_cli_quick_preset_table_plots_and_predict_error(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "runs")
    # --predict s: the quick preset has sizes xs and s, so there is one smaller size and no trend.
    # The sweep runs first (12 trials), the table is printed, then the prediction fails.
    code = main(["sweep", "qk_layernorm", "--quick", "--workers", "2", "--out", out, "--predict", "s"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.strip().count("\n") == 0
    assert captured.err.startswith("seismo: error: --predict: need at least two sizes smaller than s")
    assert "qk_layernorm-quick: LR sensitivity" in captured.out
    # the same command without --predict: every trial is stored, so it only reports
    code = main(["sweep", "qk_layernorm", "--quick", "--workers", "2", "--out", out])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    text = captured.out
    assert "12 trials (2 interventions x 2 sizes x 3 lrs x 1 seeds)" in text
    assert "qk_layernorm-quick: LR sensitivity (Wortsman et al. 2023)" in text
    assert "qk_layernorm-quick: trials" not in text  # the per-trial table only with --trials here
    for iv in ("baseline", "qk_norm"):
        for size in ("xs", "s"):
            assert re.search(rf"{iv}\W+{size}\W+[0-9.e+]+\W+[0-9.]+\W+[0-9.e-]+\W+[0-9]+%", text), (iv, size)
    plot_dir = Path(out) / "sweep-qk_layernorm-quick"
    for stem in ("loss_vs_lr", "lr_sensitivity_vs_size", "attn_logit_vs_size"):
        for ext in ("png", "svg"):
            path = plot_dir / f"{stem}.{ext}"
            assert str(path) in text
            assert path.stat().st_size > 1000
    assert (plot_dir / "loss_vs_lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with RunStore(Path(out) / "seismo.sqlite") as store:
        assert len(store.runs()) == 12


def test_cli_full_batch_preset_prints_trial_measures_and_curves(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "runs")
    assert main(["sweep", "edge_of_stability", "--quick", "--workers", "1", "--out", out, "--set", "steps=120"]) == 0
    text = capsys.readouterr().out
    assert "edge_of_stability-quick: trials" in text and "sharp/thr" in text
    rows = load_sweep_results(Path(out) / "seismo.sqlite", "edge_of_stability-quick")
    assert sorted(r["lr"] for r in rows) == [0.1, 0.2]
    for r in rows:
        assert r["steps_done"] == 120 and math.isfinite(r["sharpness_ratio"])
        assert re.search(rf"gd\W+w64\W+{r['lr']:g}\W+completed.*{r['sharpness_ratio']:.3f}", text), r["lr"]
    plot_dir = Path(out) / "sweep-edge_of_stability-quick"
    assert (plot_dir / "sharpness_vs_step.png").stat().st_size > 1000
    assert not (plot_dir / "attn_logit_vs_size.png").exists()  # no attention in an MLP


@pytest.mark.parametrize("argv, match", [
    (["sweep", "no_such_preset"], "sweep: unknown preset 'no_such_preset'"),
    (["sweep", "qk_layernorm", "--quick", "--workers", "0"], "--workers: must be >= 1"),
    (["sweep", "qk_layernorm", "--quick", "--set", "model.nope=1"], "model.nope: unknown key"),
    (["sweep", "missing.toml"], "sweep file missing.toml"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, argv, match, one_error_line):
    code = main(argv + ["--out", str(tmp_path)])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    assert match in line
    assert not (tmp_path / "seismo.sqlite").exists()


def test_cli_predict_with_an_unknown_size_is_an_error(tmp_path, capsys, one_error_line):
    toml = tmp_path / "one.toml"
    toml.write_text('name = "one"\nlrs = [1e-2]\noverrides = ' + json.dumps(TINY_RUN) + '\n[sizes]\nxs = ' + json.dumps(SIZES["xs"]) + "\n")
    code = main(["sweep", str(toml), "--workers", "1", "--out", str(tmp_path), "--predict", "huge"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    assert "--predict: 'huge' is neither a size of this sweep (xs) nor a parameter count" in line
