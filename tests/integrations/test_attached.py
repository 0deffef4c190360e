"""The parts both callbacks share (seismo/integrations/_attached.py), without a framework."""

from __future__ import annotations

import math

import pytest
import torch

from seismo.errors import ConfigError
from seismo.events import Event
from seismo.integrations._attached import AttachedMonitor, CallbackOptions, GuardedStep, event_line
from seismo.mitigate.guard import Guard
from seismo.store import load_run


def _model_and_sgd(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _opts(**kw) -> CallbackOptions:
    base = dict(diagnose=False, alerts=False, monitor_options={"preset": "minimal"})
    return CallbackOptions(**{**base, **kw})


def _backward(model, x):
    loss = model(x).pow(2).mean()
    loss.backward()
    return loss


def test_step_loss_is_the_sum_of_the_backpropagated_losses():
    model, opt = _model_and_sgd()
    a = AttachedMonitor(model, opt, _opts(), start_step=7, run_name="t")
    parts = [torch.tensor(0.25), torch.tensor(1.5), torch.tensor(2.0)]
    for p in parts:
        a.add_loss(p)
    assert float(a.step_loss()) == 3.75  # 0.25 + 1.5 + 2.0, exact in binary
    a.end_step()
    assert a.step_loss() is None
    a.add_loss(torch.ones(3))  # not a scalar: ignored, never raised into the loop
    a.end_step()
    a.monitor.flush()
    s, v = a.monitor.series("loss")
    assert s == [7] and v == [3.75]  # numbered from start_step; the second step had no loss
    a.close()


def test_check_stop_by_kind_and_by_severity():
    model, opt = _model_and_sgd()
    warn = Event("loss_spike", "warning", 3)
    crit = Event("loss_divergence", "critical", 4)
    a = AttachedMonitor(model, opt, _opts(stop_on="critical"), start_step=0, run_name="t")
    assert a.check_stop([warn]) is None and a.check_stop([warn, crit]) is crit
    b = AttachedMonitor(model, opt, _opts(stop_on=["loss_spike"]), start_step=0, run_name="t")
    assert b.check_stop([crit]) is None and b.check_stop([crit, warn]) is warn
    a.close()
    b.close()


def test_event_line_and_log_counts():
    e = Event("attention_logit_growth", "warning", 57, "blocks.0.attn", "max logit 310", {}, "qk-layernorm")
    assert event_line(e) == "step 57: warning attention_logit_growth [blocks.0.attn]: max logit 310 Advice: qk-layernorm"
    assert event_line(Event("stall", "info", 2)) == "step 2: info stall: "
    model, opt = _model_and_sgd()
    a = AttachedMonitor(model, opt, _opts(), start_step=0, run_name="t")
    counts, text = a.events_for_log([e, e, Event("stall", "info", 3)])
    assert counts == {"seismo/events/attention_logit_growth": 2.0, "seismo/events/stall": 1.0}
    assert text.count("\n") == 2
    a.close()


def test_guarded_step_applies_a_finite_step_exactly_and_skips_a_nonfinite_one():
    ref_model, ref_opt = _model_and_sgd()
    model, opt = _model_and_sgd()
    x = torch.randn(8, 4)
    guard = Guard(model, opt, policy="skip", zero_grad=False)
    loss_box: list[torch.Tensor] = []
    gs = GuardedStep(guard, opt, lambda: loss_box[-1], lambda: None)
    for _ in range(3):  # plain SGD is the reference
        _backward(ref_model, x)
        ref_opt.step()
        ref_opt.zero_grad()
        loss_box.append(_backward(model, x).detach())
        opt.step()  # through the Guard
        opt.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref_model.parameters()))
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(x * math.inf).pow(2).mean()
    loss.backward()
    loss_box.append(loss.detach())
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    guard.flush()
    assert guard.stats["skipped_steps"] == 1
    gs.remove()
    assert "step" not in opt.__dict__


def test_guarded_step_runs_the_closure_once():
    model, opt = _model_and_sgd()
    guard = Guard(model, opt, policy="skip", zero_grad=False)
    calls = []

    def closure():
        calls.append(1)
        return _backward(model, torch.ones(2, 4))

    gs = GuardedStep(guard, opt, lambda: None, lambda: None)  # no loss seen: judged by the gradient
    before = [p.detach().clone() for p in model.parameters()]
    out = opt.step(closure)
    assert len(calls) == 1 and out.ndim == 0
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    gs.remove()


class _ScaledWrapper:
    """Looks like an fp16 AcceleratedOptimizer: an optimizer behind a GradScaler."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.scaler = object()


def test_a_guard_that_cannot_work_fails_at_attach_and_closes_the_run(tmp_path):
    model, opt = _model_and_sgd()
    store = tmp_path / "s.sqlite"
    with pytest.raises(ConfigError, match="GradScaler"):
        AttachedMonitor(model, _ScaledWrapper(opt), _opts(store=store, guard="skip"), start_step=0, run_name="fp16")
    assert load_run(store, "fp16").info.status == "failed"
    assert "step" not in opt.__dict__


@pytest.mark.parametrize(("kw", "match"), [
    ({"guard_config": "skip"}, "guard_config: expected a seismo.GuardConfig"),
    ({"config": {"preset": "full"}}, "config: expected a seismo.MonitorConfig"),
    ({"monitor_options": {"preset": "huge"}}, "MonitorConfig.preset"),
])
def test_options_fail_with_the_field_named(kw, match):
    with pytest.raises(ConfigError, match=match):
        CallbackOptions(**kw)
