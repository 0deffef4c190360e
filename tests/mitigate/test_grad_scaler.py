"""fp16 with ``torch.amp.GradScaler`` on CPU: the Monitor's gradient signals are the unscaled ones.

The same fp16-autocast model and batches are trained twice: once with a GradScaler at 2**12
(the backward's gradients are 4096x the true ones; scaling by a power of two is exact in fp16
away from under/overflow), once without scaling. The gradient norms the Monitor records in the
scaled run, read during the backward (before ``scaler.step`` unscales), must equal the unscaled
run's; without ``use_grad_scaler`` they are 4096x larger (the check can fail). An overflow makes
the scaler skip the step and halve its scale: ``amp/loss_scale`` records the drop and the default
detectors turn it into a ``loss_scale_drop`` event.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from seismo.errors import ConfigError
from seismo.monitor import Monitor
from seismo.monitor.gradients import use_grad_scaler

SCALE = 2.0**12
STEPS = 4


def run(scaler: torch.amp.GradScaler | None, tell_monitor: bool = True, overflow_at: int = -1) -> dict[str, list[float]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    mon = Monitor(model, opt, probes="minimal", flush_every=1)
    if scaler is not None and tell_monitor:
        use_grad_scaler(mon, scaler)
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        if step == overflow_at:
            loss = loss * math.inf  # inf gradients: the scaler skips this step
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)
        mon.step(loss)
    mon.close()
    return {n: vs for n, (_, vs) in mon.history.items()}


def test_gradient_norms_are_the_unscaled_ones():
    ref = run(None)
    scaled = run(torch.amp.GradScaler("cpu", init_scale=SCALE))
    names = [n for n in ref if n.startswith("grad/norm")]
    assert "grad/norm" in names and len(names) >= 3
    for n in names:
        assert len(scaled[n]) == STEPS
        for a, b in zip(scaled[n], ref[n]):
            assert math.isclose(a, b, rel_tol=1e-6), (n, a, b)
    raw = run(torch.amp.GradScaler("cpu", init_scale=SCALE), tell_monitor=False)
    assert math.isclose(raw["grad/norm"][0], SCALE * ref["grad/norm"][0], rel_tol=1e-6)


def test_an_overflow_is_a_loss_scale_drop_event():
    from seismo.diagnose import Diagnoser, default_detectors

    hist = run(torch.amp.GradScaler("cpu", init_scale=SCALE), overflow_at=1)
    assert hist["amp/loss_scale"] == [SCALE, SCALE, SCALE / 2, SCALE / 2]  # backoff 0.5 after the skipped step
    assert hist["grad/nonfinite"][1] > 0 and hist["grad/nonfinite"][2] == 0
    diag = Diagnoser(default_detectors())
    for step in range(STEPS):
        diag(step, {n: vs[step] for n, vs in hist.items() if len(vs) == STEPS})
    drops = [e for e in diag.events if e.kind == "loss_scale_drop"]
    assert [(e.step, e.severity, e.evidence["scale"]) for e in drops] == [(2, "info", SCALE / 2)]


def test_use_grad_scaler_needs_a_gradient_probe():
    with pytest.raises(ConfigError, match="GradientProbe"):
        use_grad_scaler([], torch.amp.GradScaler("cpu"))


def test_the_guard_composes_with_the_scaler():
    """An fp16 overflow (gradients only; the loss the Guard sees is normal) is the scaler's skip:
    no Guard skip or event, parameters unchanged, the scale halved, and the window never sees the
    inf norm. A real loss spike later is still the Guard's skip. Both in sync and mask mode."""
    from seismo.mitigate.guard import Guard

    for mode in ("sync", "mask"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
        guard = Guard(model, opt, policy="skip", skip_mode=mode, warmup=5, scaler=scaler)
        overflow, spike, unchanged = 8, 12, {}
        for i in guard.steps(16):
            g = torch.Generator().manual_seed(i)
            x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(x), y)
            scaler.scale(loss * 1e30 if i == overflow else loss).backward()  # 1e30 x SCALE overflows fp16
            before = [p.detach().clone() for p in model.parameters()]
            scale_before = scaler.get_scale()
            guard.step(loss * 1000.0 if i == spike else loss)
            if i in (overflow, spike):
                unchanged[i] = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
            if i == overflow:
                assert scaler.get_scale() == scale_before / 2, mode
        guard.flush()
        assert unchanged == {overflow: True, spike: True}, mode
        assert [(e.kind, e.step) for e in guard.events] == [("guard_skip", spike)], mode
        assert guard.stats["skipped_steps"] == 1, mode
