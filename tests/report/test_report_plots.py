"""Figures at the data level: what each line and image holds, checked against the stored series
and hand computations; and the backend hygiene (no pyplot, no matplotlib.use)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from report_data import INIT_LOSS, SWEEP_LRS, SWEEP_SIZES, attn_logit, sweep_loss, write_sweep  # noqa: E402

from seismo.report.figures import figure_svg, max_over_prefix, module_matrix, mpl_text  # noqa: E402
from seismo.report.plots import plot_runs, runs_figure  # noqa: E402
from seismo.report.sweep_plots import attn_logit_vs_size_figure, loss_vs_lr_figure, plot_sweep  # noqa: E402
from seismo.report.sweep_report import load_sweep  # noqa: E402
from seismo.store import RunStore  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _hist():
    return {
        "loss": (np.array([0, 1, 2, 3]), np.array([4.0, 3.0, 2.5, 2.0])),
        # two modules on different steps, one NaN: the max is taken per step over finite values
        "attn/logit_max/a": (np.array([0, 1, 2]), np.array([1.0, 5.0, np.nan])),
        "attn/logit_max/b": (np.array([1, 2, 3]), np.array([2.0, 7.0, 9.0])),
        "logits/logz_mean": (np.array([0, 2]), np.array([0.5, 1.5])),
    }


def test_max_over_prefix_by_hand():
    steps, vals = max_over_prefix(_hist(), "attn/logit_max/")
    # step 0: a=1; step 1: max(5, 2)=5; step 2: a is NaN -> b=7; step 3: b=9
    assert steps.tolist() == [0, 1, 2, 3]
    assert vals.tolist() == [1.0, 5.0, 7.0, 9.0]


def test_module_matrix_aligns_modules_by_step():
    modules, steps, m = module_matrix(_hist(), "attn/logit_max/")
    assert modules == ["a", "b"] and steps.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(m, [[1.0, 5.0, np.nan, np.nan], [np.nan, 2.0, 7.0, 9.0]])


def test_runs_figure_plots_the_stored_series_and_the_max_over_modules():
    hist = _hist()
    other = {"loss": (np.array([0, 5]), np.array([9.0, 8.0]))}
    fig = runs_figure({"one": hist, "two": other}, title="t")
    loss_ax, attn_ax, logz_ax = fig.axes
    one, two = loss_ax.lines
    assert one.get_label() == "one" and two.get_label() == "two"
    np.testing.assert_array_equal(one.get_xdata(), [0, 1, 2, 3])
    np.testing.assert_array_equal(one.get_ydata(), [4.0, 3.0, 2.5, 2.0])
    np.testing.assert_array_equal(two.get_ydata(), [9.0, 8.0])
    (attn,) = attn_ax.lines  # run "two" has no attention signal: no line
    np.testing.assert_array_equal(attn.get_ydata(), [1.0, 5.0, 7.0, 9.0])
    assert attn_ax.get_yscale() == "log"
    np.testing.assert_array_equal(logz_ax.lines[0].get_xdata(), [0, 2])


def test_plot_runs_writes_png_and_svg_atomically(tmp_path):
    png = plot_runs({"r": _hist()}, tmp_path / "a" / "plot.png")
    svg = plot_runs({"r": _hist()}, tmp_path / "a" / "plot.svg")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in svg.read_bytes()[:2000]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["plot.png", "plot.svg"]  # no temporary files left


def test_plotting_leaves_the_users_backend_and_pyplot_alone(tmp_path):
    """The user picked the pdf backend; seismo must not switch it, nor import pyplot."""
    code = textwrap.dedent(f"""
        import sys, matplotlib
        matplotlib.use("pdf")
        import numpy as np
        from seismo.report.plots import plot_runs
        from seismo.report import write_report
        plot_runs({{"r": {{"loss": (np.arange(3), np.ones(3))}}}}, {str(tmp_path / 'p.png')!r})
        assert matplotlib.get_backend() == "pdf", matplotlib.get_backend()
        assert "matplotlib.pyplot" not in sys.modules
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO), MPLBACKEND="")
    env.pop("MPLBACKEND")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_user_strings_are_literal_matplotlib_text():
    assert mpl_text("lr=$1$") == r"lr=\$1\$"
    assert not mpl_text("_hidden").startswith("_")  # would hide the legend entry
    from seismo.report.figures import new_figure

    fig, axes = new_figure()
    axes[0][0].plot([0, 1], [0, 1], label=mpl_text("cost $x^2"))  # an unbalanced $ fails mathtext
    axes[0][0].legend()
    assert "cost $x^2" in figure_svg(fig)


def test_loss_vs_lr_is_the_capped_final_loss_in_lr_order(store_path):
    write_sweep(store_path)
    with RunStore(store_path) as store:
        table = load_sweep(store, "toy")
    fig = loss_vs_lr_figure(table)
    assert [ax.get_title() for ax in fig.axes] == ["baseline", "qk_norm"]
    for ax, iv in zip(fig.axes, ["baseline", "qk_norm"]):
        assert ax.get_xscale() == "log"
        for line, size in zip(ax.lines, ["s", "m"]):  # sizes ordered by parameter count
            assert line.get_label().startswith(size)
            np.testing.assert_array_equal(line.get_xdata(), SWEEP_LRS)
            want = []
            for lr in SWEEP_LRS:
                loss, status = sweep_loss(iv, size, lr)
                want.append(INIT_LOSS if status == "diverged" else min(loss, INIT_LOSS))
            np.testing.assert_allclose(line.get_ydata(), want)


def test_attn_logit_vs_size_fit_recovers_the_power_law(store_path):
    write_sweep(store_path)
    with RunStore(store_path) as store:
        table = load_sweep(store, "toy")
    fig = attn_logit_vs_size_figure(table, lr=1e-1)
    ax = fig.axes[0]
    points = [ln for ln in ax.lines if ln.get_label() == "baseline"][0]
    np.testing.assert_allclose(points.get_xdata(), sorted(SWEEP_SIZES.values()))
    np.testing.assert_allclose(points.get_ydata(), [attn_logit("baseline", s, 1e-1) for s in ("s", "m")])
    fit = [ln for ln in ax.lines if ln.get_label().startswith("baseline fit")][0]
    assert fit.get_label() == "baseline fit: N^0.50"  # logit = 0.3 sqrt(N)
    x = np.asarray(fit.get_xdata())
    np.testing.assert_allclose(fit.get_ydata(), 0.3 * np.sqrt(x), rtol=1e-9)


def test_plot_sweep_writes_each_figure_twice(store_path, tmp_path):
    write_sweep(store_path)
    with RunStore(store_path) as store:
        table = load_sweep(store, "toy")
    paths = plot_sweep(table, tmp_path / "sweep")
    assert sorted(p.name for p in paths) == sorted(f"{b}.{e}" for b in ("loss_vs_lr", "lr_sensitivity_vs_size", "attn_logit_vs_size")
                                                   for e in ("png", "svg"))
    assert all(p.stat().st_size > 1000 for p in paths)
    assert math.isfinite(table.sensitivity[("baseline", "s")])


def test_trial_curves_plot_each_trials_series_and_its_threshold(store_path, tmp_path):
    from report_data import write_run

    from seismo.report.sweep_plots import accuracy_figure, plot_trial_curves, sharpness_trials_figure

    steps = np.arange(0, 50, 10)
    acc = {"val/acc": (steps, np.linspace(0.1, 0.9, 5)), "train/acc": (steps, np.linspace(0.5, 1.0, 5)),
           "logits/softmax_collapse": (steps, np.linspace(0.0, 0.3, 5))}
    eig = {"hessian/max_eig": (steps, np.array([5.0, 50.0, 190.0, 201.0, 199.0]))}
    rows = [dict(run_id=write_run(store_path, "a", acc), intervention="baseline", size="s", lr=0.01, final_val_acc=0.9),
            dict(run_id=write_run(store_path, "b", eig), intervention="baseline", size="s", lr=0.01, sharpness_ratio=1.0)]
    with RunStore(store_path) as store:
        fig = accuracy_figure(store, rows)
        test_line, train_line = fig.axes[0].lines
        np.testing.assert_allclose(test_line.get_ydata(), acc["val/acc"][1])
        np.testing.assert_allclose(train_line.get_ydata(), acc["train/acc"][1])
        assert train_line.get_color() == test_line.get_color() and train_line.get_linestyle() == ":"
        np.testing.assert_allclose(fig.axes[1].lines[0].get_ydata(), acc["logits/softmax_collapse"][1])
        fig = sharpness_trials_figure(store, rows)
        curve, threshold = fig.axes[0].lines
        np.testing.assert_allclose(curve.get_ydata(), eig["hessian/max_eig"][1])
        assert list(threshold.get_ydata()) == [200.0, 200.0]  # 2 / lr (Cohen et al. 2021)
    paths = plot_trial_curves(store_path, rows, tmp_path / "curves")
    assert sorted(p.name for p in paths) == [f"{b}.{e}" for b in ("accuracy_vs_step", "sharpness_vs_step") for e in ("png", "svg")]
    assert plot_trial_curves(store_path, [], tmp_path / "none") == [] and not (tmp_path / "none").exists()
