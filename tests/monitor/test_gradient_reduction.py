"""The gradient probe's reduction: once per backward pass, at its end, for all gradients at once.

Checked against float64 references computed here from the gradients themselves: square sums and
non-finite counts of both reduction forms (the CPU loop and the foreach form used on
accelerators), per-module norms under gradient accumulation where the micro-batches touch
different parameters, and the number of reductions per step (one per backward, not one per
parameter), and a reentrant checkpoint's nested backward.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint

from seismo.monitor import Monitor
from seismo.monitor.gradients import GradientProbe, _sums_foreach, _sums_loop


def _grads(dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = [torch.randn(shape, generator=g).to(dtype) for shape in ((7, 5), (300,), (3, 4, 6), (1,))]
    out[0][2, 3] = float("nan")
    out[1][10] = float("inf")
    out[1][11] = float("-inf")
    out[2][1, 2, 3] = float("nan")
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduce", [_sums_loop, _sums_foreach], ids=["loop", "foreach"])
def test_square_sums_and_nonfinite_counts_match_a_float64_reference(reduce, dtype):
    grads = _grads(dtype)
    sq, bad = reduce(grads)
    assert len(sq) == len(bad) == len(grads)
    for g, s, b in zip(grads, sq, bad):
        ref = g.double()
        finite = torch.isfinite(ref)
        assert float(b) == float((~finite).sum())  # exact count of nan and +-inf entries
        if finite.all():
            assert float(s) == pytest.approx(float(ref.pow(2).sum()), rel=1e-5)
            assert s.dtype in (torch.float32, torch.float64)  # never accumulated in bf16
        else:
            assert not math.isfinite(float(s))


def test_finite_gradients_both_forms_agree():
    grads = [torch.randn(50, 40), torch.randn(17)]
    (a, ba), (b, bb) = _sums_loop(grads), _sums_foreach(grads)
    for x, y in zip(a, b):
        assert float(x) == pytest.approx(float(y), rel=1e-6)
    assert [float(v) for v in ba] == [float(v) for v in bb] == [0.0, 0.0]


class TwoBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 3)
        self.b = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, use_a: bool) -> torch.Tensor:
        y = self.b(x)
        return (y + self.a(x)) if use_a else y


def test_accumulation_over_micro_batches_that_touch_different_parameters():
    """Micro-batch 1 uses a and b, micro-batch 2 only b: a's norm is its gradient after micro-batch 1
    (its final gradient), b's the accumulated one - what the optimizer step sees."""
    torch.manual_seed(0)
    model = TwoBranch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, opt, probes="minimal", flush_every=1)
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        x1, x2 = torch.randn(4, 6), torch.randn(4, 6)
        model(x1, use_a=True).pow(2).sum().backward()
        model(x2, use_a=False).pow(2).mean().backward()
        grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters()}
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # after the reading: must not show
        opt.step()
        mon.step(model(x1, use_a=True).sum().detach())
        for mod in ("a", "b"):
            ref = math.sqrt(sum(float(g.pow(2).sum()) for n, g in grads.items() if n.startswith(mod + ".")))
            assert mon.history[f"grad/norm/{mod}"][1][-1] == pytest.approx(ref, rel=1e-6), (step, mod)
        total = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
        assert mon.history["grad/norm"][1][-1] == pytest.approx(total, rel=1e-6)
    mon.close()


def test_one_reduction_per_backward_not_per_parameter(monkeypatch):
    calls = []
    real = GradientProbe._reduce

    def spy(self, params, idx):
        calls.append(len(params))
        return real(self, params, idx)

    monkeypatch.setattr(GradientProbe, "_reduce", spy)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, opt, probes="minimal", every=2, flush_every=10)
    for step in range(4):
        calls.clear()
        opt.zero_grad(set_to_none=True)
        for _ in range(2):  # two micro-batches
            model(torch.randn(3, 8)).sum().backward()
        opt.step()
        mon.step(torch.tensor(1.0))
        # tracked steps: one reduction per backward, each over all 6 parameters; untracked: none
        assert calls == ([6, 6] if step % 2 == 0 else []), (step, calls)
    mon.close()


class Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
        self.head = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.requires_grad_()
        h = torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=True)
        return self.head(h)


def test_reentrant_checkpointing_nested_backward_still_reads_every_gradient():
    """A reentrant checkpoint runs a nested backward: its end-of-backward callback fires before the
    outer one's, with only the inner parameters; every norm must still be the gradient's."""
    torch.manual_seed(0)
    model = Checkpointed()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, opt, probes="minimal", flush_every=1)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        model(torch.randn(5, 6)).pow(2).sum().backward()
        grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters()}
        opt.step()
        mon.step(torch.tensor(0.0))
        for mod in ("inner.0", "inner.2", "head"):
            ref = math.sqrt(sum(float(g.pow(2).sum()) for n, g in grads.items() if n.rsplit(".", 1)[0] == mod))
            assert mon.history[f"grad/norm/{mod}"][1][-1] == pytest.approx(ref, rel=1e-6), mod
        total = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
        assert mon.history["grad/norm"][1][-1] == pytest.approx(total, rel=1e-6)
    mon.close()


def test_a_backward_that_raised_does_not_silence_the_next_one():
    """A backward that raises (an OOM caught by a retry loop) never runs its end-of-backward
    callback; the next backward of the step must still be reduced (it once recorded the first
    micro-batch's norm only)."""

    class Boom(torch.autograd.Function):
        fail = False

        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            if Boom.fail:
                raise RuntimeError("simulated OOM")
            return g

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 1)

        def forward(self, x):
            return self.b(Boom.apply(self.a(x)))

    torch.manual_seed(0)
    m = M()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    mon = Monitor(m, opt, probes="minimal", flush_every=1)
    opt.zero_grad(set_to_none=True)
    m(torch.randn(3, 4)).sum().backward()  # micro-batch 1
    Boom.fail = True
    with pytest.raises(RuntimeError, match="simulated OOM"):
        m(torch.randn(3, 4)).sum().backward()  # fails after b's gradient accumulated
    Boom.fail = False
    m(torch.randn(3, 4)).sum().backward()  # the retry
    ref = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in m.parameters()))
    opt.step()
    mon.step(torch.tensor(1.0))
    assert mon.history["grad/norm"][1][-1] == pytest.approx(ref, rel=1e-6)
    mon.close()
