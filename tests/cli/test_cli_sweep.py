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
    # --predict s: the quick preset has sizes xs and s, so there is one smaller size and no trend:
    # refused before anything runs (a fit needs 3 sizes; through 2 it has R^2 = 1 whatever the data).
    code = main(["sweep", "qk_layernorm", "--quick", "--workers", "2", "--out", out, "--predict", "s"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.strip().count("\n") == 0
    assert captured.err.startswith("seismo: error: --predict: need >= 3 sizes smaller than s to fit a trend, this sweep has 1 other size")
    assert "R^2 = 1 by construction" in captured.err
    assert "LR sensitivity" not in captured.out and not (Path(out) / "seismo.sqlite").exists()
    # without --predict: the 12 trials run and are reported
    code = main(["sweep", "qk_layernorm", "--quick", "--workers", "2", "--out", out])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    text = captured.out
    assert "12 trials (2 interventions x 2 sizes x 3 lrs x 1 seeds)" in text
    assert "qk_layernorm-quick: LR sensitivity (Wortsman et al. 2023)" in text
    assert "qk_layernorm-quick: trials" not in text  # the per-trial table only with --trials here
    for iv in ("baseline", "qk_norm"):
        for size in ("xs", "s"):
            # params, LR sensitivity, within 10x of best, best lr, diverged (one seed: no per-seed column)
            assert re.search(rf"{iv}\W+{size}\W+[0-9.e+]+\W+[0-9.]+\W+[0-9.]+\W+[0-9.e-]+\W+[0-9]+%", text), (iv, size)
    assert "per seed" not in text
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


# --- --predict on a synthetic store ------------------------------------------------------------------
# Four sizes a < b < c < d (the real xxs..m models, so the sweep's configs are valid, but with
# synthetic n_params 1e2, 1e4, 1e6, 1e8), two LRs and two seeds; every trial is already in the store,
# so `seismo sweep` trains nothing and only reports. Seed 0's max attention logit is 0.9 x, seed 1's
# 1.1 x the seed mean c(lr) * sqrt(N) (x 3 at size b for lr 1e-1):
#   lr 1e-2, c = 0.095: an exact power law; the fit on a, b, c predicts 0.095 * sqrt(1e8) = 950 at d,
#     below the failure level 1e3: stable, R^2 = 1. Seed 1 alone (the last seed) would give 1045:
#     UNSTABLE, so a prediction keyed by size only (the last seed wins) fails this test.
#   lr 1e-1, c = 0.2, x 3 at b: in log-log the points are a line plus [0, d, 0], d = ln 3, at
#     log-sizes spaced by h = ln 100. By symmetry the slope stays 0.5 and the intercept rises by d/3:
#     predicted 0.2 * 1e4 * 3 ** (1/3) = 2884.5 (UNSTABLE). Residuals [-d/3, 2d/3, -d/3], so
#     SS_res = 2 d^2 / 3, SS_tot = h^2 / 2 + 2 d^2 / 3, and R^2 = 1 - SS_res / SS_tot = 0.9295.
# At d, lr 1e-1 ends 1.0 nats above the best loss in both seeds (unstable by the loss), lr 1e-2 at it.
PRED_SIZES = {"a": ("xxs", 1e2), "b": ("xs", 1e4), "c": ("s", 1e6), "d": ("m", 1e8)}
PRED_C = {1e-2: 0.095, 1e-1: 0.2}


def _synthetic_sweep(tmp_path, sizes=PRED_SIZES) -> str:
    """A sweep TOML and a store holding every one of its trials (synthetic results, no training)."""
    from seismo.proxy.sweep import expand, load_sweep_file

    toml = tmp_path / "pred.toml"
    toml.write_text('name = "pred"\nlrs = [1e-2, 1e-1]\nseeds = [0, 1]\noverrides = ' + json.dumps(TINY_RUN) + "\n[sizes]\n"
                    + "".join(f"{name} = {json.dumps(SIZES[real])}\n" for name, (real, _) in sizes.items()))
    with RunStore(tmp_path / "seismo.sqlite") as store:
        for t in expand(load_sweep_file(toml)):
            n = sizes[t.size][1]
            logit = PRED_C[t.lr] * n**0.5 * (3.0 if (t.size, t.lr) == ("b", 1e-1) else 1.0) * (0.9 if t.seed == 0 else 1.1)
            loss = 3.0 if (t.size, t.lr) == ("d", 1e-1) else 2.0
            meta = dict(sweep=t.sweep, trial_key=t.key, intervention=t.intervention, size=t.size, lr=t.lr, seed=t.seed,
                        status="completed", steps_done=10, final_train_loss=loss, final_val_loss=loss, init_loss=4.0,
                        max_attn_logit=logit, n_params=n, diverged_at=None)
            store.record_run(t.run_name, config=t.config, meta=meta, status="completed")
    return str(toml)


def _prediction_lines(text: str) -> dict[float, str]:
    return {float(m.group(1)): m.group(0) for m in re.finditer(r"lr ([0-9.e+-]+): predicted .*", text)}


def test_cli_predict_fits_seed_means_and_prints_r2(tmp_path, capsys):
    toml = _synthetic_sweep(tmp_path)
    code = main(["sweep", toml, "--workers", "1", "--out", str(tmp_path), "--predict", "d"])
    out = capsys.readouterr().out
    assert code == 0
    text = " ".join(out.split())  # rich wraps long lines at the console width
    assert "16 trials (1 interventions x 4 sizes x 2 lrs x 2 seeds)" in text
    with RunStore(tmp_path / "seismo.sqlite") as store:
        assert len(store.runs()) == 16  # every trial was already stored: nothing ran
    assert "Prediction for d (1e+08 params, baseline) from 3 smaller sizes (a, b, c; seeds 0, 1)" in text
    lines = _prediction_lines(out)
    assert set(lines) == {1e-2, 1e-1}
    h, d = math.log(100.0), math.log(3.0)
    r2 = 1 - (2 * d**2 / 3) / (h**2 / 2 + 2 * d**2 / 3)
    assert r2 == pytest.approx(0.9295, abs=1e-4)
    assert lines[1e-2] == ("lr 0.01: predicted 950.0 -> stable (R^2 1.00, exponent 0.50, 3 sizes); "
                           "observed logit 950.0 (seed mean), unstable by the loss in 0 of 2 seeds")
    assert lines[1e-1] == (f"lr 0.1: predicted {2000 * 3 ** (1 / 3):.1f} -> UNSTABLE (R^2 {r2:.2f}, exponent 0.50, 3 sizes); "
                           "observed logit 2000.0 (seed mean), unstable by the loss in 2 of 2 seeds")
    assert f"R^2 of the 2 fits: {r2:.2f} to 1.00" in text
    assert "predicted lowest unstable lr: 0.1" in text
    assert "observed lowest unstable lr (at least half the seeds): 0.1" in text
    assert "prediction right at 2 of 2 lrs" in text


def test_cli_predict_a_parameter_count_that_was_not_run(tmp_path, capsys):
    toml = _synthetic_sweep(tmp_path)
    assert main(["sweep", toml, "--workers", "1", "--out", str(tmp_path), "--predict", "1e10"]) == 0
    out = capsys.readouterr().out
    # every size is smaller than 1e10, so the fit uses all four: for lr 1e-2 the exact law gives
    # 0.095 * 1e5 = 9500; nothing was run at 1e10, so there is nothing observed to compare with
    assert "from 4 smaller sizes (a, b, c, d;" in " ".join(out.split())
    lines = _prediction_lines(out)
    assert lines[1e-2].startswith("lr 0.01: predicted 9500.0 -> UNSTABLE (R^2 1.00, exponent 0.50, 4 sizes); not run")
    assert "prediction right at" not in out


def test_cli_predict_refuses_a_two_point_fit_after_the_run(tmp_path, capsys, one_error_line):
    """b has 3 other sizes in the sweep (so the early check passes) but only a is smaller."""
    toml = _synthetic_sweep(tmp_path)
    code = main(["sweep", toml, "--workers", "1", "--out", str(tmp_path), "--predict", "b"])
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert code == 2
    assert "--predict: need >= 3 sizes to fit, got 1 (a): a power law through 2 points has R^2 = 1 by construction" in line
    assert "LR sensitivity" in captured.out  # the sweep's own report came first


def test_cli_predict_refuses_before_running_with_fewer_than_three_other_sizes(tmp_path, capsys, one_error_line):
    sizes = {k: PRED_SIZES[k] for k in ("a", "b", "c")}
    toml = _synthetic_sweep(tmp_path, sizes)
    code = main(["sweep", toml, "--workers", "1", "--out", str(tmp_path / "other"), "--predict", "c"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    assert "--predict: need >= 3 sizes smaller than c to fit a trend, this sweep has 2 other sizes" in line
    assert "R^2 = 1 by construction" in line
    assert not (tmp_path / "other" / "seismo.sqlite").exists()


def test_cli_sensitivity_table_near_best_and_per_seed(tmp_path, capsys):
    """One size, LRs 1e-4, 1e-2, 1e-1, two seeds, initial loss 4.0 (synthetic store, nothing trains).
    Final losses: seed 0 [3.8, 2.0, 2.6], seed 1 [3.6, 2.2, 2.0]; seed means [3.7, 2.1, 2.3].
      whole grid (seed means): ((3.7 - 2.1) + 0 + (2.3 - 2.1)) / 3 = 0.600, best lr 1e-2
      within 10x of 1e-2 (1e-4 is 100x away): (0 + 0.2) / 2 = 0.100
      per seed: seed 0 (1.8 + 0 + 0.6) / 3 = 0.800, seed 1 (1.6 + 0.2 + 0) / 3 = 0.600"""
    from seismo.proxy.sweep import expand, load_sweep_file

    toml = tmp_path / "sens.toml"
    toml.write_text('name = "sens"\nlrs = [1e-4, 1e-2, 1e-1]\nseeds = [0, 1]\noverrides = ' + json.dumps(TINY_RUN)
                    + "\n[sizes]\nxs = " + json.dumps(SIZES["xs"]) + "\n")
    losses = {0: {1e-4: 3.8, 1e-2: 2.0, 1e-1: 2.6}, 1: {1e-4: 3.6, 1e-2: 2.2, 1e-1: 2.0}}
    with RunStore(tmp_path / "seismo.sqlite") as store:
        for t in expand(load_sweep_file(toml)):
            loss = losses[t.seed][t.lr]
            meta = dict(sweep=t.sweep, trial_key=t.key, intervention=t.intervention, size=t.size, lr=t.lr, seed=t.seed,
                        status="completed", steps_done=10, final_train_loss=loss, final_val_loss=loss, init_loss=4.0,
                        max_attn_logit=5.0, n_params=1e4, diverged_at=None)
            store.record_run(t.run_name, config=t.config, meta=meta, status="completed")
    assert main(["sweep", str(toml), "--workers", "1", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "per seed (min-max)" in " ".join(text.split()) or "per seed" in text
    assert re.search(r"baseline\W+xs\W+1e\+04\W+0\.600\W+0\.100\W+0\.600-0\.800 \(2\)\W+0\.01\W+0%", text), text
