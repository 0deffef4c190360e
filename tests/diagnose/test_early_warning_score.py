"""The failure and lead-time definitions of bench/early_warning.py, on hand-built series whose
answers are worked out by hand in the comments (not read back from the code)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from _early_warning_score import distribution, failure_step, lead_time, per_1000, smoothed_loss  # noqa: E402


def test_smoothed_loss_is_a_causal_trailing_mean_skipping_nonfinite():
    x = [1.0, 3.0, math.nan, 5.0, 7.0]
    # window 2: [1], [1,3], [1,3] (nan skipped), [3,5], [5,7]
    assert smoothed_loss(x, 2).tolist() == [1.0, 2.0, 2.0, 4.0, 6.0]
    assert math.isnan(smoothed_loss([math.nan, 1.0], 3)[0])


def test_a_clean_descent_does_not_fail():
    steps = np.arange(2000)
    loss = 3.0 + 2.0 * np.exp(-steps / 300)
    assert failure_step(steps, loss) is None


def test_a_lasting_rise_fails_at_the_first_step_the_smoothed_loss_clears_the_margin():
    # flat 2.0 for 1000 steps, then a jump to 3.0 that stays. Trailing mean of 25: after k steps at
    # 3.0 it is 2 + k / 25, which exceeds 2.5 first at k = 13 (2.52), i.e. step 1000 + 12.
    steps = np.arange(2000)
    loss = np.where(steps < 1000, 2.0, 3.0)
    assert failure_step(steps, loss, margin=0.5, smooth=25, hold=100) == 1012


def test_a_spike_that_recovers_is_not_a_failure():
    # 2.0, with 60 steps at 4.0 (smoothed above 2.5 for about 60 steps, < hold 100), then back
    steps = np.arange(2000)
    loss = np.where((steps >= 1000) & (steps < 1060), 4.0, 2.0)
    assert failure_step(steps, loss, hold=100) is None
    # ... but it is with a shorter hold: 4.0 for k steps gives 2 + 2k/25 > 2.5 at k = 7 -> step 1006
    assert failure_step(steps, loss, hold=50) == 1006


def test_best_so_far_not_the_start_is_the_reference():
    # the loss falls 5 -> 2 over 1000 steps and climbs back to 2.8 by step 1500, staying there:
    # 2.8 is far below the start (5) but 0.8 above the best; the smoothed loss crosses best + 0.5
    steps = np.arange(2500)
    loss = np.interp(steps, [0, 1000, 1500, 2499], [5.0, 2.0, 2.8, 2.8])
    f = failure_step(steps, loss, margin=0.5, smooth=1, hold=100)
    # with smooth = 1 the loss itself: best 2.0 at step 1000, 2.0 + 0.8 * (t - 1000) / 500 > 2.5 first at
    # t - 1000 > 312.5 -> step 1313
    assert f == 1313


def test_a_nonfinite_loss_is_a_failure_at_that_step_at_the_latest():
    steps = np.arange(500)
    loss = np.full(500, 2.0)
    loss[300:] = math.inf
    assert failure_step(steps, loss) == 300
    # a rise that started before the NaN and stayed up until it: the rise counts even with < hold steps left
    loss = np.full(500, 2.0)
    loss[250:300] = 4.0
    loss[300:] = math.nan
    assert failure_step(steps, loss, smooth=25, hold=100) == 256  # 2 + 2k/25 > 2.5 at k = 7: step 256


def test_a_rise_too_close_to_the_end_is_not_called():
    steps = np.arange(1000)
    loss = np.where(steps < 950, 2.0, 4.0)  # only 50 steps left: cannot tell it will last
    assert failure_step(steps, loss, hold=100) is None


def test_failure_step_uses_recorded_steps_not_indices():
    steps = np.arange(0, 4000, 2)  # every other step recorded
    loss = np.where(steps < 2000, 2.0, 3.0)
    # index 1000 is step 2000; 13th value at 3.0 is index 1012 -> step 2024
    assert failure_step(steps, loss) == 2024


def test_lead_time_counts_only_warnings_at_or_before_the_failure():
    assert lead_time(1000, [1200, 400, 900]) == 600
    assert lead_time(1000, [1000]) == 0
    assert lead_time(1000, [1001, 2000]) is None
    assert lead_time(None, [10]) is None
    assert lead_time(1000, []) is None


def test_distribution_matches_hand_quartiles():
    d = distribution([10, 20, 30, 40, 50])
    assert (d["n"], d["min"], d["q1"], d["median"], d["q3"], d["max"]) == (5, 10, 20, 30, 40, 50)
    d = distribution([1, 2, 3, 4])  # linear interpolation: q1 at position 0.75 -> 1.75, q3 at 2.25 -> 3.25
    assert d["q1"] == pytest.approx(1.75) and d["median"] == pytest.approx(2.5) and d["q3"] == pytest.approx(3.25)
    assert distribution([])["n"] == 0 and math.isnan(distribution([])["median"])


def test_per_1000():
    assert per_1000(3, 6000) == pytest.approx(0.5)
    assert math.isnan(per_1000(1, 0))
