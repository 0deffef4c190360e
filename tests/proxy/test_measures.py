"""The sweep measures of Wortsman et al. 2023 (arXiv 2309.14322), checked against numbers worked
out by hand and against METHODS.md §1.3 (LR sensitivity) and §1.7 (predicting instability from
smaller models): ``lr_sensitivity`` (whole grid and near the best LR), ``optimal_lr``,
``divergence_rate``, seed spreads, the loss-based definition of an unstable LR, ``fit_power_law``,
the held-out-size ``scaling_prediction``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import seismo._stats
from seismo.proxy import measures
from seismo.proxy.measures import (
    PowerLaw,
    Spread,
    capped_final_loss,
    cell_spread,
    divergence_rate,
    fit_power_law,
    lr_sensitivity,
    lr_sensitivity_near_best,
    optimal_lr,
    scaling_prediction,
    seed_spread,
    sensitivity_over_seeds,
    unstable_fraction,
)

NAN, INF = math.nan, math.inf


# --- LR sensitivity: E_eta[min(l(eta), l0)] - min_eta l(eta) --------------------------------------

def test_lr_sensitivity_hand_computed_with_a_diverged_trial():
    # Four LRs of a grid; the third diverged (NaN), the fourth ended above the initial loss.
    #   losses        = [3.0, 2.0, nan, 5.0],  l0 = 4.0
    #   capped at l0  = [3.0, 2.0, 4.0, 4.0]   (NaN -> l0; 5.0 -> min(5.0, 4.0) = 4.0)
    #   mean          = (3 + 2 + 4 + 4) / 4 = 13 / 4 = 3.25
    #   best (l*)     = 2.0
    #   sensitivity   = 3.25 - 2.0 = 1.25
    assert lr_sensitivity([3.0, 2.0, NAN, 5.0], 4.0) == pytest.approx(1.25, abs=1e-12)


def test_inf_counts_as_diverged_like_nan():
    # +inf and -inf are both non-finite: the run diverged, its loss is l0 (never -inf as the best)
    assert lr_sensitivity([3.0, 2.0, INF, 5.0], 4.0) == lr_sensitivity([3.0, 2.0, NAN, 5.0], 4.0)
    assert lr_sensitivity([3.0, 2.0, -INF, 5.0], 4.0) == pytest.approx(1.25, abs=1e-12)


def test_sensitivity_is_zero_when_every_lr_reaches_the_best_loss():
    assert lr_sensitivity([2.5, 2.5, 2.5], 4.0) == 0.0
    assert lr_sensitivity([2.5], 4.0) == 0.0
    # every run diverged: all are capped at l0, so they all "reach" the same (capped) best
    assert lr_sensitivity([NAN, INF, 7.0], 4.0) == 0.0
    # exactly 0, not -4e-16: the mean of three equal floats minus one of them is not 0 in floating point
    assert lr_sensitivity([NAN, NAN, NAN], 2.9698573834500506) == 0.0


def test_sensitivity_is_positive_when_one_lr_misses_the_best():
    assert lr_sensitivity([2.5, 2.5, 2.5 + 1e-9], 4.0) > 0.0
    assert lr_sensitivity([2.5, 2.5, NAN], 4.0) == pytest.approx((4.0 - 2.5) / 3)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.floats(0.0, 20.0, allow_subnormal=False), st.just(NAN), st.just(INF)), min_size=1, max_size=9),
       st.floats(0.5, 15.0))
def test_sensitivity_is_nonnegative_and_zero_iff_all_capped_losses_are_equal(losses, l0):
    s = lr_sensitivity(losses, l0)
    capped = [min(x, l0) if math.isfinite(x) else l0 for x in losses]
    assert s >= 0.0
    assert s <= l0 - min(capped) + 1e-12  # the mean of the capped losses never exceeds l0
    assert (s == 0.0) == (len(set(capped)) == 1)


def test_wortsman_initial_loss_is_ln_vocab():
    # METHODS.md §1.3 worked example: T5 vocabulary V = 32 101, uniform softmax at init
    l0 = math.log(32101)
    assert l0 == pytest.approx(10.377, abs=5e-4)
    # a grid where the two highest LRs diverge: their losses count as l0 = ln V
    losses = [3.1, 2.9, 3.0, NAN, NAN]
    expected = (3.1 + 2.9 + 3.0 + 2 * l0) / 5 - 2.9
    assert lr_sensitivity(losses, l0) == pytest.approx(expected, abs=1e-12)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="at least one"):
        lr_sensitivity([], 4.0)
    with pytest.raises(ValueError, match="finite"):
        lr_sensitivity([1.0], NAN)


# --- optimal LR and divergence rate ------------------------------------------------------------------

LRS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]


def test_optimal_lr_is_the_lr_of_the_lowest_loss():
    assert optimal_lr(LRS, [3.0, 2.5, 2.2, 2.4, NAN], 4.0) == 1e-2
    assert optimal_lr(LRS, [3.0, 2.5, 2.2, 2.1, INF]) == 3e-2  # default l0: no cap


def test_optimal_lr_never_picks_a_diverged_trial():
    # without a cap a NaN must not win either (np.argmin would return the NaN's index)
    assert optimal_lr(LRS, [NAN, 2.5, 2.2, 2.4, NAN]) == 1e-2
    assert optimal_lr(LRS, [-INF, 2.5, 2.2, 2.4, NAN], 4.0) == 1e-2


def test_divergence_rate():
    assert divergence_rate(["completed", "diverged", "completed", "diverged"]) == 0.5
    assert divergence_rate(["completed"]) == 0.0
    assert math.isnan(divergence_rate([]))


# --- power-law fits and prediction -------------------------------------------------------------------

def test_fit_power_law_recovers_exponent_and_intercept():
    x = np.array([1e4, 3e4, 1e5, 3e5, 1e6])
    y = 2.5 * x**0.35  # intercept ln 2.5
    fit = fit_power_law(x, y)
    assert fit.exponent == pytest.approx(0.35, abs=1e-12)
    assert fit.intercept == pytest.approx(math.log(2.5), abs=1e-10)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert fit(1e7) == pytest.approx(2.5 * 1e7**0.35, rel=1e-10)
    # a decreasing law (grad RMS vs size, §1.7) works the same
    dec = fit_power_law(x, 0.1 * x**-0.5)
    assert (dec.exponent, dec.intercept) == (pytest.approx(-0.5, abs=1e-12), pytest.approx(math.log(0.1), abs=1e-10))


def test_fit_power_law_ignores_unusable_points_and_needs_two():
    x = [1e4, 1e5, 1e6, 1e7, 0.0]
    y = [10.0, 100.0, NAN, -5.0, 3.0]  # only the first two are positive and finite: y = 1e-3 * x
    fit = fit_power_law(x, y)
    assert fit.exponent == pytest.approx(1.0, abs=1e-12)
    assert fit.intercept == pytest.approx(math.log(1e-3), abs=1e-10)
    with pytest.raises(ValueError, match="two"):
        fit_power_law([1e4, 1e5], [10.0, NAN])
    with pytest.raises(ValueError):
        fit_power_law([], [])


def test_fit_power_law_r2_below_one_on_noisy_data():
    x = np.array([1.0, 2.0, 4.0, 8.0])
    y = x**2 * np.array([1.0, 1.3, 0.8, 1.1])
    fit = fit_power_law(x, y)
    assert 0.9 < fit.r2 < 1.0
    assert isinstance(fit, PowerLaw)


def test_shared_measures_are_one_implementation():
    """measures.py re-exports the _stats functions the report layer uses: one definition, not copies."""
    import seismo.report.sweep_report as sweep_report

    assert measures.lr_sensitivity is seismo._stats.lr_sensitivity is sweep_report.lr_sensitivity
    assert measures.divergence_rate is seismo._stats.divergence_rate
    assert not hasattr(measures, "predict_unstable_lrs")  # the size prediction is scaling_prediction only


def test_fit_power_law_counts_its_points():
    assert fit_power_law([1.0, 2.0], [1.0, 4.0]).n == 2
    assert fit_power_law([1.0, 2.0, 4.0, 0.0], [1.0, 4.0, 15.0, 3.0]).n == 3


# --- LR sensitivity near the best LR -----------------------------------------------------------------

GRID = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]


def test_near_best_sensitivity_drops_the_under_trained_end_by_hand():
    # best at 3e-3 (2.4); within 10x: 3e-4 .. 3e-2 -> [3.6, 2.8, 2.4, 2.5, 2.7]
    #   mean = (3.6 + 2.8 + 2.4 + 2.5 + 2.7) / 5 = 14.0 / 5 = 2.8;  sensitivity = 2.8 - 2.4 = 0.4
    # with the best at 1e-2 instead, 3e-4 (30x below) drops out: [1e-3 .. 1e-1]
    losses = [3.6, 2.8, 2.4, 2.5, 2.7, 3.0, 3.2]
    assert lr_sensitivity_near_best(GRID, losses, 5.5) == pytest.approx(0.4, abs=1e-12)
    losses2 = [3.6, 2.8, 2.5, 2.4, 2.7, 3.0, 3.2]
    #   kept: 1e-3, 3e-3, 1e-2, 3e-2, 1e-1 -> [2.8, 2.5, 2.4, 2.7, 3.0]; mean 13.4 / 5 = 2.68; minus 2.4 = 0.28
    assert lr_sensitivity_near_best(GRID, losses2, 5.5) == pytest.approx(0.28, abs=1e-12)
    # the whole grid, for comparison: (3.6 + 2.8 + 2.5 + 2.4 + 2.7 + 3.0 + 3.2) / 7 - 2.4 = 20.2 / 7 - 2.4
    assert lr_sensitivity(losses2, 5.5) == pytest.approx(20.2 / 7 - 2.4, abs=1e-12)


def test_near_best_sensitivity_counts_divergence_as_the_initial_loss():
    # best 1e-2 (2.4); kept 1e-3 .. 1e-1: [2.8, 2.5, 2.4, nan -> 4.0, 4.0 (capped 6.0)]
    losses = [9.0, 2.8, 2.5, 2.4, NAN, 6.0, NAN]
    expected = (2.8 + 2.5 + 2.4 + 4.0 + 4.0) / 5 - 2.4
    assert lr_sensitivity_near_best(GRID, losses, 4.0) == pytest.approx(expected, abs=1e-12)
    assert lr_sensitivity_near_best(GRID, losses, 4.0, within=1.0) == 0.0  # the best LR alone
    with pytest.raises(ValueError, match="within"):
        lr_sensitivity_near_best(GRID, losses, 4.0, within=0.5)
    with pytest.raises(ValueError, match="same length"):
        lr_sensitivity_near_best(GRID[:3], losses, 4.0)


# --- seeds --------------------------------------------------------------------------------------------

def test_seed_spread_by_hand():
    # values 2.0, 2.2, 2.6: mean 6.8 / 3; deviations -0.2667, -0.0667, 0.3333; sum of squares
    #   0.071111 + 0.004444 + 0.111111 = 0.186667; / (3 - 1) = 0.093333; sqrt = 0.305505
    sp = seed_spread([2.0, 2.2, 2.6])
    assert sp == Spread(pytest.approx(6.8 / 3), pytest.approx(0.3055050463, abs=1e-9), 2.0, 2.6, 3)
    assert seed_spread([1.5]) == Spread(1.5, 0.0, 1.5, 1.5, 1)
    with pytest.raises(ValueError):
        seed_spread([])


def _row(iv, size, lr, seed, loss, status="completed", l0=4.0, **kw):
    return dict(intervention=iv, size=size, lr=lr, seed=seed, final_val_loss=loss, status=status, init_loss=l0, **kw)


def test_capped_final_loss():
    assert capped_final_loss(_row("b", "s", 1e-2, 0, 2.5)) == 2.5
    assert capped_final_loss(_row("b", "s", 1e-2, 0, 5.0)) == 4.0  # above l0: capped
    assert capped_final_loss(_row("b", "s", 1e-2, 0, 2.5, status="diverged")) == 4.0
    assert capped_final_loss(_row("b", "s", 1e-2, 0, NAN, status="failed")) == 4.0


def test_sensitivity_over_seeds_is_per_seed_then_spread():
    lrs = [1e-3, 1e-2, 1e-1]
    # seed 0: [3.0, 2.0, 4.0 (diverged)] -> mean 3.0 - 2.0 = 1.0
    # seed 1: [2.5, 2.0, 2.5]             -> mean 7.0 / 3 - 2.0 = 1 / 3
    # seed 2 lacks LR 1e-1: left out (a partial curve has another grid)
    rows = [_row("b", "s", lr, 0, x, status="diverged" if lr == 1e-1 else "completed") for lr, x in zip(lrs, [3.0, 2.0, 2.1])]
    rows += [_row("b", "s", lr, 1, x) for lr, x in zip(lrs, [2.5, 2.0, 2.5])]
    rows += [_row("b", "s", lr, 2, x) for lr, x in zip(lrs[:2], [2.5, 2.0])]
    sp = sensitivity_over_seeds(rows)[("b", "s")]
    assert sp.n == 2
    assert sp.mean == pytest.approx((1.0 + 1 / 3) / 2, abs=1e-12)
    assert (sp.lo, sp.hi) == (pytest.approx(1 / 3), pytest.approx(1.0))
    # near the best (1e-2, within 10x keeps all three here): the same numbers
    assert sensitivity_over_seeds(rows, near_best=True)[("b", "s")].mean == pytest.approx(sp.mean)
    # within 1x: only the best LR -> 0 for every seed
    assert sensitivity_over_seeds(rows, near_best=True, within=1.0)[("b", "s")].mean == 0.0


def test_cell_spread_groups_by_intervention_size_lr():
    rows = [_row("b", "s", 1e-2, seed, loss, max_attn_logit=logit) for seed, loss, logit in [(0, 2.0, 10.0), (1, 2.4, 30.0)]]
    cs = cell_spread(rows)
    assert list(cs) == [("b", "s", 1e-2)]
    assert cs[("b", "s", 1e-2)].mean == pytest.approx(2.2) and cs[("b", "s", 1e-2)].std == pytest.approx(math.sqrt(0.08))
    assert cell_spread(rows, "max_attn_logit")[("b", "s", 1e-2)].mean == 20.0


def test_unstable_means_diverged_or_above_best_by_the_margin_on_the_high_side():
    lrs = [1e-3, 1e-2, 3e-2, 1e-1]
    # seed 0: best 1e-2 (2.0). 1e-3 at 3.0 is under-trained, not unstable (low side).
    #   3e-2 at 2.05: within the 0.1 margin -> stable; 1e-1 at 2.3 -> unstable
    # seed 1: best 1e-2 (2.0); 3e-2 at 2.2 -> unstable; 1e-1 diverged -> unstable
    rows = [_row("b", "s", lr, 0, x) for lr, x in zip(lrs, [3.0, 2.0, 2.05, 2.3])]
    rows += [_row("b", "s", lr, 1, x, status="diverged" if lr == 1e-1 else "completed") for lr, x in zip(lrs, [3.0, 2.0, 2.2, NAN])]
    u = unstable_fraction(rows, margin=0.1)
    assert u == {("b", "s", 1e-3): 0.0, ("b", "s", 1e-2): 0.0, ("b", "s", 3e-2): 0.5, ("b", "s", 1e-1): 1.0}
    assert unstable_fraction(rows, margin=0.5)[("b", "s", 1e-1)] == 0.5  # only the divergence is left


# --- the held-out size prediction --------------------------------------------------------------------

def _scaling_rows():
    # max logit = c(lr) * N ** 0.5 exactly, sizes 1e2, 1e4, 1e6 (fit) and 1e8 (held out), two seeds.
    #   lr 1e-2: c = 0.05 -> predicted 0.05 * 1e4 = 500 (< 1e3: stable); observed at 1e8 stable
    #   lr 1e-1: c = 0.2  -> predicted 2000 (>= 1e3: unstable); observed loss 3.0 > best 2.0 + 0.1
    sizes = {"a": 1e2, "b": 1e4, "c": 1e6, "d": 1e8}
    rows = []
    for seed in (0, 1):
        for name, n in sizes.items():
            for lr, c, loss in ((1e-2, 0.05, 2.0), (1e-1, 0.2, 3.0 if name == "d" else 2.02)):
                rows.append(_row("base", name, lr, seed, loss, n_params=n, max_attn_logit=c * n**0.5 * (1.1 if seed else 0.9)))
    return rows


def test_scaling_prediction_on_a_held_out_size():
    pts = scaling_prediction(_scaling_rows(), "base", "d", threshold=1e3)
    assert [p.lr for p in pts] == [1e-2, 1e-1]
    p1, p2 = pts
    # the seed mean is c * sqrt(N) (0.9 and 1.1 average to 1): exact power law, R^2 = 1 from 3 points
    assert p1.predicted_logit == pytest.approx(500.0, rel=1e-9) and not p1.predicted_unstable
    assert p2.predicted_logit == pytest.approx(2000.0, rel=1e-9) and p2.predicted_unstable
    assert p1.exponent == pytest.approx(0.5) and p1.r2 == pytest.approx(1.0) and p1.n_sizes == 3
    assert p1.observed_unstable == 0.0 and p2.observed_unstable == 1.0
    assert p2.observed_logit == pytest.approx(0.2 * 1e4)


def test_scaling_prediction_refuses_two_point_fits():
    rows = [r for r in _scaling_rows() if r["size"] != "a"]
    with pytest.raises(ValueError, match=">= 3 sizes"):
        scaling_prediction(rows, "base", "d", threshold=1e3)
    with pytest.raises(ValueError, match="R\\^2 = 1"):
        scaling_prediction(_scaling_rows(), "base", "d", threshold=1e3, min_sizes=2)
    with pytest.raises(ValueError, match="target size"):
        scaling_prediction(_scaling_rows(), "base", "zz", threshold=1e3)


def test_scaling_prediction_r2_below_one_on_a_bent_trend():
    rows = _scaling_rows()
    for r in rows:
        if r["size"] == "b":
            r["max_attn_logit"] *= 3.0
    p = scaling_prediction(rows, "base", "d", threshold=1e3)[0]
    # log y = log c + 0.5 log N + [0, ln 3, 0]: residuals of a line through three points, by hand
    lx = np.log([1e2, 1e4, 1e6])
    ly = np.log(0.05) + 0.5 * lx + np.array([0.0, math.log(3.0), 0.0])
    b, a = np.polyfit(lx, ly, 1)
    r2 = 1 - ((ly - (a + b * lx)) ** 2).sum() / ((ly - ly.mean()) ** 2).sum()
    assert p.r2 == pytest.approx(r2, abs=1e-12) and p.r2 < 1.0
    # by symmetry the slope is unchanged and the intercept rises by ln(3) / 3
    assert p.predicted_logit == pytest.approx(500.0 * 3.0 ** (1 / 3), rel=1e-9)


def test_scaling_prediction_uses_seed_means_not_the_last_seed():
    """lr 1e-2 with c = 0.095: the seed mean (0.9 x and 1.1 x) predicts 950 at 1e8, below 1e3;
    seed 1 alone would predict 1045, above it. Keying by size only (the last seed wins) fails here."""
    rows = _scaling_rows()
    for r in rows:
        if r["lr"] == 1e-2:
            r["max_attn_logit"] *= 0.095 / 0.05
    p = scaling_prediction(rows, "base", "d", threshold=1e3)[0]
    assert p.predicted_logit == pytest.approx(950.0, rel=1e-9) and not p.predicted_unstable
    seed1 = [r for r in rows if r["seed"] == 1]
    assert scaling_prediction(seed1, "base", "d", threshold=1e3)[0].predicted_logit == pytest.approx(1045.0, rel=1e-9)


def test_scaling_prediction_to_a_parameter_count():
    """A target given as a parameter count: sizes below it are fitted; one not run has no observation,
    one equal to a size's n_params is that size."""
    rows = _scaling_rows()
    far = scaling_prediction(rows, "base", 1e10, threshold=1e3)
    assert [p.n_sizes for p in far] == [4, 4]  # a, b, c and d are all below 1e10
    assert far[0].predicted_logit == pytest.approx(0.05 * 1e5, rel=1e-9)
    assert math.isnan(far[0].observed_logit) and math.isnan(far[0].observed_unstable)
    same = scaling_prediction(rows, "base", 1e8, threshold=1e3)
    assert same == scaling_prediction(rows, "base", "d", threshold=1e3)
    with pytest.raises(ValueError, match="got 1 \\(a\\): a power law through 2 points has R\\^2 = 1 by construction"):
        scaling_prediction(rows, "base", 1e3, threshold=1e3)
    with pytest.raises(ValueError, match="positive"):
        scaling_prediction(rows, "base", -1.0, threshold=1e3)
