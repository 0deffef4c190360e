"""The sweep measures of Wortsman et al. 2023 (arXiv 2309.14322), checked against numbers worked
out by hand and against METHODS.md §1.3 (LR sensitivity) and §1.7 (predicting instability from
smaller models): ``lr_sensitivity``, ``optimal_lr``, ``divergence_rate``, ``fit_power_law`` and
``predict_unstable_lrs``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seismo.proxy.measures import PowerLaw, divergence_rate, fit_power_law, lr_sensitivity, optimal_lr, predict_unstable_lrs

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
@given(st.lists(st.one_of(st.floats(0.0, 20.0, allow_subnormal=False), st.just(NAN), st.just(INF)), min_size=1, max_size=9), st.floats(0.5, 15.0))
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


def test_predict_unstable_lrs_on_synthetic_power_laws():
    # max attention logit = c(lr) * N ** 0.5 for three model sizes; the target has 1e8 parameters.
    #   lr 1e-3: c = 0.01 -> 0.01 * 1e4 = 100    at 1e8: stable   (< 1000)
    #   lr 1e-2: c = 0.05 -> 0.05 * 1e4 = 500    at 1e8: stable
    #   lr 1e-1: c = 0.2  -> 0.2  * 1e4 = 2000   at 1e8: UNSTABLE (>= 1000)
    # At the largest size run (1e6 -> sqrt = 1e3) all three are still below 1000: 10, 50, 200.
    sizes = [1e4, 1e5, 1e6]
    coef = {1e-3: 0.01, 1e-2: 0.05, 1e-1: 0.2}
    table = {lr: {n: c * n**0.5 for n in sizes} for lr, c in coef.items()}
    assert all(v < 1e3 for by in table.values() for v in by.values())
    pred = predict_unstable_lrs(table, 1e8, threshold=1e3)
    assert list(pred) == [1e-3, 1e-2, 1e-1]  # ascending lr
    for lr, c in coef.items():
        assert pred[lr][0] == pytest.approx(c * 1e4, rel=1e-9)
    assert [lr for lr, (_, unstable) in pred.items() if unstable] == [1e-1]
    # reaching the threshold exactly counts as unstable
    assert predict_unstable_lrs(table, 1e8, threshold=2000.0 * (1 - 1e-9))[1e-1][1]


def test_predict_uses_only_smaller_sizes_and_skips_lrs_without_a_trend():
    table = {
        1e-2: {1e4: 1.0, 1e6: 10.0, 1e8: 5000.0},  # the target's own (observed) value is not used
        1e-1: {1e4: 3.0, 1e8: 9.0},  # one smaller size only: no fit, no prediction
    }
    pred = predict_unstable_lrs(table, 1e8, threshold=1e3)
    assert list(pred) == [1e-2]
    value, unstable = pred[1e-2]
    assert value == pytest.approx(100.0, rel=1e-9) and not unstable
    assert predict_unstable_lrs({}, 1e8, 1e3) == {}
