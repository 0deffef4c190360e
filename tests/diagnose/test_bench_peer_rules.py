"""The peer rules the detection benchmarks score seismo against (``bench/_detection_peers.py``),
checked against hand computations of each project's rule."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from _detection_peers import FoundryKillLossSpike, LightningSpikeDetection, OlmoSpikeRule  # noqa: E402


def _olmo_after(history, x):
    rule = OlmoSpikeRule()
    for v in history:
        rule.update(v)
    return rule.update(x)


def test_olmo_core_rule_is_two_sided_6_sigma_over_the_previous_values():
    hist = [1.0, 1.2] * 40  # 80 values; the rule sees the last 128 (all of them here)
    mean, std = np.mean(hist), np.std(hist, ddof=1)
    assert _olmo_after(hist, mean + 6.5 * std) is True
    assert _olmo_after(hist, mean - 6.5 * std) is True  # a sudden drop is flagged too (|z|)
    assert _olmo_after(hist, mean + 5.5 * std) is False
    assert _olmo_after([1.0, 1.2] * 31, 100.0) is False  # inactive before 64 values (63 + the current one)
    assert _olmo_after([1.0, 1.2] * 32, 100.0) is True


def test_olmo_core_rule_lets_spikes_into_its_own_history():
    rule = OlmoSpikeRule()
    for v in [1.0, 1.2] * 40:
        rule.update(v)
    assert rule.update(50.0) is True
    assert rule.update(3.0) is False  # the first spike inflated the std: a second, smaller one passes


def test_llm_foundry_kills_at_the_fifth_consecutive_doubling_of_the_window_mean():
    rule = FoundryKillLossSpike(total_steps=1000)  # window max(100, 5% of 1000) = 100
    assert [rule.update(1.0) for _ in range(100)] == [False] * 100
    # 3.0 >= 2 x mean while k outliers have entered the window (mean = 1 + 0.02 k)
    assert [rule.update(3.0) for _ in range(6)] == [False] * 4 + [True, True]
    rule2 = FoundryKillLossSpike(total_steps=1000)
    for _ in range(100):
        rule2.update(1.0)
    assert [rule2.update(v) for v in (3.0, 3.0, 1.0, 3.0, 3.0, 3.0, 3.0)] == [False] * 7  # the streak was broken


def test_lightning_flags_a_loss_three_times_its_running_mean_that_is_no_improvement():
    rule = LightningSpikeDetection()
    for _ in range(10):
        assert rule.update(1.0) is False
    assert rule.update(2.9) is False  # |2.9 - 1| < 2 x 1
    rule = LightningSpikeDetection()
    for _ in range(10):
        rule.update(1.0)
    assert rule.update(3.0) is True  # |3 - 1| >= 2 x 1 and worse than the last accepted loss
    assert rule.update(math.nan) is True  # non-finite counts
