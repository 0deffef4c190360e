"""AdaGC, ZClip and Adam-atan2 against hand-written references of the papers' rules (and pytorch-optimizer's AdaGC)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from seismo.mitigate import optimizers as O
from seismo.mitigate import transforms as T

DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(tx, grads_stream, params):
    state = tx.init(params)
    outs = []
    for grads in grads_stream:
        out, state = tx.update(grads, state, params)
        outs.append(out)
    return outs, state


# ---- ZClip -------------------------------------------------------------------------------------


class ZClipReference:
    """The official algorithm (bluorion-com/ZClip, zscore / adaptive_scaling), on Python floats."""

    def __init__(self, alpha=0.97, z_thresh=2.5, warmup=25, eps=1e-6):
        self.alpha, self.z, self.warmup, self.eps = alpha, z_thresh, warmup, eps
        self.buffer, self.mean, self.var = [], None, None

    def step(self, norm: float) -> float:
        """Returns the factor the gradients are multiplied by."""
        if self.mean is None:
            self.buffer.append(norm)
            if len(self.buffer) >= self.warmup:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
            return 1.0
        std = self.var ** 0.5
        z = (norm - self.mean) / (std + self.eps)
        clip = None
        if z > self.z:
            clip = self.mean + (self.z * std) / (z / self.z)
        factor = clip / (norm + 1e-6) if clip is not None and norm > clip else 1.0
        x = clip if clip is not None else norm
        self.mean = self.alpha * self.mean + (1 - self.alpha) * x
        self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
        return factor


def test_zclip_matches_the_official_algorithm_step_by_step():
    g = torch.Generator().manual_seed(0)
    norms = [1.0 + 0.1 * float(torch.randn((), generator=g)) for _ in range(40)]
    norms[30] = 8.0   # a spike after the warm-up
    norms[34] = 2.0   # a milder one
    direction = torch.randn(7, generator=g, dtype=DT)
    direction /= direction.norm()
    params = [torch.zeros(7, dtype=DT)]
    stream = [[n * direction] for n in norms]
    outs, state = run(T.zclip(warmup=25), stream, params)
    ref = ZClipReference(warmup=25)
    factors = [ref.step(n) for n in norms]
    for n, f, out in zip(norms, factors, outs):
        assert float(out[0].norm()) == pytest.approx(n * f, rel=1e-9)
    assert factors[30] < 0.5 and factors[34] < 1.0  # both spikes were clipped ...
    assert int(state.clipped) == sum(f < 1.0 for f in factors) >= 2
    assert float(state.mean) == pytest.approx(ref.mean, rel=1e-9) and float(state.var) == pytest.approx(ref.var, rel=1e-9)
    # ... the spike to mean + z * std / (z / z_thresh): with the reference's statistics before step 30
    ref2 = ZClipReference(warmup=25)
    for n in norms[:30]:
        ref2.step(n)
    std = ref2.var ** 0.5
    z = (8.0 - ref2.mean) / (std + 1e-6)
    assert float(outs[30][0].norm()) == pytest.approx(ref2.mean + 2.5 * std * 2.5 / z, rel=1e-6)


def test_zclip_never_clips_in_warm_up_and_ignores_nonfinite_norms():
    params = [torch.zeros(3, dtype=DT)]
    stream = [[torch.full((3,), 1.0 + i, dtype=DT)] for i in range(4)]
    stream.insert(2, [torch.full((3,), math.nan, dtype=DT)])
    outs, state = run(T.zclip(warmup=4), stream, params)
    for inp, out in zip(stream[:2] + stream[3:], outs[:2] + outs[3:]):
        assert torch.equal(inp[0], out[0])
    assert int(state.filled) == 4  # the NaN was not collected
    expect = [math.sqrt(3) * (1 + i) for i in range(4)]
    assert float(state.mean) == pytest.approx(sum(expect) / 4)


def test_zclip_max_norm_caps_on_top():
    params = [torch.zeros(2, dtype=DT)]
    outs, _ = run(T.zclip(warmup=2, max_norm=0.5), [[torch.tensor([3.0, 4.0], dtype=DT)]] * 3, params)
    for out in outs:
        assert float(out[0].norm()) == pytest.approx(0.5, rel=1e-6)


# ---- AdaGC -------------------------------------------------------------------------------------


def adagc_reference(stream, lambda_rel=1.05, beta=0.98, warmup=3, lambda_abs=1.0, eps=1e-8):
    """Algorithm 1 of arXiv 2502.11034 on lists of float64 tensors, written out with Python floats for the norms."""
    gammas, outs = None, []
    for t, grads in enumerate(stream):
        gn = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
        out, new = [], []
        for i, g in enumerate(grads):
            n = float(g.norm())
            if t < warmup:
                h = min(1.0, lambda_abs / (gn + eps))
                n_hat = h * n
                gam = n_hat if gammas is None else min(gammas[i], n_hat)
            else:
                h = min(1.0, lambda_rel * max(gammas[i], eps) / max(n, eps))
                n_hat = h * n
                gam = beta * gammas[i] + (1 - beta) * n_hat
            out.append(g * h)
            new.append(gam)
        gammas = new
        outs.append(out)
    return outs, gammas


def test_adagc_matches_the_papers_algorithm():
    g = torch.Generator().manual_seed(1)
    shapes = [(4, 3), (3,)]
    stream = []
    for t in range(12):
        scale = 30.0 if t == 8 else (0.2 if t < 3 else 1.0)
        stream.append([scale * torch.randn(s, generator=g, dtype=DT) for s in shapes])
    stream[5][0] = stream[5][0] * 0.01  # far under its running norm: passes unchanged
    stream[5][1] = stream[5][1] * 10.0  # a spike in one tensor only: only that tensor is clipped
    params = [torch.zeros(s, dtype=DT) for s in shapes]
    outs, state = run(T.adagc(warmup=3), stream, params)
    ref_outs, ref_gammas = adagc_reference(stream, warmup=3)
    for out, ref in zip(outs, ref_outs):
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for a, b in zip(state.gamma, ref_gammas):
        assert float(a) == pytest.approx(b, rel=1e-12)
    assert torch.equal(outs[5][0], stream[5][0]) and not torch.equal(outs[5][1], stream[5][1])
    assert float(outs[8][0].norm()) < 0.1 * float(stream[8][0].norm())


def test_adagc_with_adam_equals_pytorch_optimizer_adagc():
    """pytorch-optimizer fuses AdaGC into Adam; its warm-up covers steps 1 .. warmup_steps - 1."""
    po = pytest.importorskip("pytorch_optimizer")
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    b = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    b.load_state_dict(a.state_dict())
    lib = po.AdaGC(a.parameters(), lr=1e-2, weight_decay=0.0, warmup_steps=4, eps=1e-8, foreach=False)
    ours = torch.optim.Adam(b.parameters(), lr=1e-2, eps=1e-8)
    T.attach(ours, T.adagc(warmup=3, eps=1e-8))
    g = torch.Generator().manual_seed(2)
    for t in range(10):
        x = torch.randn(8, 5, generator=g, dtype=DT) * (25.0 if t == 6 else 1.0)
        y = torch.randn(8, 2, generator=g, dtype=DT)
        for model, opt in ((a, lib), (b, ours)):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-8)  # Adam amplifies float64 rounding; warmup=4 here is off by > 1e-3


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="alpha"):
        T.zclip(alpha=1.0)
    with pytest.raises(ValueError, match="lambda_rel"):
        T.adagc(beta=1.0)
    with pytest.raises(ValueError, match="AdamAtan2"):
        O.adam_atan2([torch.zeros(1, requires_grad=True)], a=0)


# ---- Adam-atan2 --------------------------------------------------------------------------------


def test_adam_atan2_matches_the_formula_without_epsilon():
    w0 = [0.5, -1.0, 2.0, 0.0]
    p = torch.tensor(w0, dtype=DT, requires_grad=True)
    opt = O.adam_atan2([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.01)
    grads = [[0.3, -2.0, 1e-12, 0.0], [0.1, -1.0, 1e-12, 0.0], [-0.2, 0.5, 1e-12, 0.0]]
    w, m, v = list(w0), [0.0] * 4, [0.0] * 4
    for t, gr in enumerate(grads, start=1):
        p.grad = torch.tensor(gr, dtype=DT)
        opt.step()
        for i, gi in enumerate(gr):
            w[i] *= 1 - 0.1 * 0.01
            m[i] = 0.9 * m[i] + 0.1 * gi
            v[i] = 0.99 * v[i] + 0.01 * gi * gi
            m_hat, v_hat = m[i] / (1 - 0.9 ** t), v[i] / (1 - 0.99 ** t)
            w[i] -= 0.1 * 1.27 * math.atan2(m_hat, 1.0 * math.sqrt(v_hat))
    torch.testing.assert_close(p.detach(), torch.tensor(w, dtype=DT), rtol=1e-12, atol=1e-14)
    # a tiny gradient still moves by ~lr * a * pi / 4 (atan2(x, x) = pi / 4): no epsilon floor ...
    d, c = 1 - 1e-3, 0.1 * 1.27 * math.pi / 4
    assert w0[2] * d ** 3 - float(p[2].detach()) == pytest.approx(c * (1 + d + d * d), rel=1e-9)
    # ... and a zero gradient (m = v = 0) gives atan2(0, 0) = 0: no NaN
    assert float(p[3].detach()) == 0.0
