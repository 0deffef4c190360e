"""LR schedules as pure functions, checked by hand, and ``lr_lambda`` driving torch's LambdaLR."""

import math

import pytest
import torch

from seismo.mitigate.schedules import lr_at, lr_lambda


def test_lr_lambda_drives_torch_lambda_lr_along_the_hand_computed_schedule():
    peak, warmup, total, floor = 3e-3, 4, 20, 3e-4
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=peak)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(peak, warmup, total, "cosine", floor))
    seen = []
    for _ in range(total + 2):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # warm-up: peak * (step + 1) / warmup; then cosine from peak at step 4 to floor at step 20
    assert seen[:4] == pytest.approx([peak * (s + 1) / 4 for s in range(4)], rel=1e-12)
    assert seen[4] == pytest.approx(peak, rel=1e-12)
    assert seen[12] == pytest.approx(floor + 0.5 * (1 + math.cos(math.pi * 8 / 16)) * (peak - floor), rel=1e-12)
    assert seen[20] == seen[21] == pytest.approx(floor, rel=1e-12)
    assert [lr_at(s, peak, warmup, total, "cosine", floor) for s in range(total + 2)] == pytest.approx(seen, rel=1e-12)


def test_lr_lambda_refuses_a_zero_peak():
    with pytest.raises(ValueError, match="peak_lr > 0"):
        lr_lambda(0.0, 1, 10)
