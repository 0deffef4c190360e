"""Tests for seismo.monitor.curvature (sharpness / Hessian probes).

Oracles: dense Hessians (torch.autograd.functional.hessian + eigvalsh),
matrices with a prescribed spectrum, and the actual behaviour of
torch.optim optimizers on quadratics.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from seismo.monitor.curvature import (
    adam_preconditioner,
    has_stability_threshold,
    hutchinson_trace,
    hvp_fn,
    lanczos_top_eigenvalue,
    power_iteration_top_eigenvalue,
    sharpness,
    stability_threshold,
)
from seismo.monitor.curvature_probe import CurvatureProbe
from seismo.monitor.monitor import Monitor

DT = torch.float64


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def sym_with_spectrum(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Random symmetric matrix Q diag(eigs) Q^T with a random orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    n = eigs.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    A = Q @ torch.diag(eigs.to(DT)) @ Q.T
    return 0.5 * (A + A.T)


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def dense_hessian(model: nn.Module, loss_of_output, x: torch.Tensor, forward=None) -> torch.Tensor:
    """Dense Hessian of the loss over the flat parameter vector (slow oracle)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    numels = [p.numel() for p in model.parameters()]

    def f(flat):
        chunks = torch.split(flat, numels)
        pd = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        if forward is None:
            out = functional_call(model, pd, (x,))
        else:
            out = forward(pd, x)
        return loss_of_output(out)

    return torch.autograd.functional.hessian(f, flat_params(model).clone())


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def mlp_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = MLP().to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(16, 5, generator=g, dtype=DT)
    y = torch.randint(0, 3, (16,), generator=g)
    return model, x, y


# --------------------------------------------------------------------------
# Eigen solvers on matrices with known spectrum
# --------------------------------------------------------------------------


SPECTRUM_30 = torch.cat(
    [torch.tensor([7.5, 5.0, -6.0, -3.0]), torch.linspace(-2.0, 2.0, 26)]
).to(DT)


def test_lanczos_recovers_max_eigenvalue_full_krylov():
    A = sym_with_spectrum(SPECTRUM_30, seed=1)
    lam = lanczos_top_eigenvalue(lambda v: A @ v, 30, iters=30)
    assert lam.dim() == 0
    true = torch.linalg.eigvalsh(A)[-1]
    assert abs(true.item() - 7.5) < 1e-10
    assert abs(lam.item() - true.item()) / true.item() < 1e-6


def test_lanczos_is_largest_algebraic_not_largest_magnitude():
    # The most negative eigenvalue dominates in magnitude.
    eigs = torch.cat([torch.tensor([-20.0, 3.0]), torch.linspace(-1, 1, 18)]).to(DT)
    A = sym_with_spectrum(eigs, seed=2)
    lam = lanczos_top_eigenvalue(lambda v: A @ v, 20, iters=20)
    assert lam.item() == pytest.approx(3.0, rel=1e-8)


def test_lanczos_fewer_iters_is_lower_bound_and_close():
    A = sym_with_spectrum(SPECTRUM_30, seed=3)
    lam = lanczos_top_eigenvalue(lambda v: A @ v, 30, iters=12).item()
    assert lam <= 7.5 + 1e-10  # Ritz values lie inside the spectrum
    assert lam > 7.5 * 0.99


def test_lanczos_early_breakdown_few_distinct_eigenvalues():
    # Only 3 distinct eigenvalues -> Krylov space has dimension 3.
    d = torch.tensor([4.0] * 10 + [1.0] * 10 + [-2.0] * 10, dtype=DT)
    calls = []

    def mv(v):
        calls.append(1)
        return d * v

    lam = lanczos_top_eigenvalue(mv, 30, iters=25)
    assert torch.isfinite(lam)
    assert lam.item() == pytest.approx(4.0, rel=1e-10)
    assert len(calls) <= 4  # stopped at breakdown instead of running 25 steps


def test_lanczos_zero_operator_and_dim_one():
    assert lanczos_top_eigenvalue(lambda v: torch.zeros_like(v), 10, iters=5).item() == 0.0
    assert lanczos_top_eigenvalue(lambda v: -3.0 * v, 1, iters=5).item() == pytest.approx(-3.0)


def test_lanczos_nonfinite_operator_gives_nan():
    lam = lanczos_top_eigenvalue(lambda v: v * float("nan"), 5, iters=5)
    assert torch.isnan(lam)


def test_lanczos_seed_determinism_and_rng_untouched():
    A = sym_with_spectrum(SPECTRUM_30, seed=4)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = lanczos_top_eigenvalue(lambda v: A @ v, 30, iters=5, seed=7)
    b = lanczos_top_eigenvalue(lambda v: A @ v, 30, iters=5, seed=7)
    c = lanczos_top_eigenvalue(lambda v: A @ v, 30, iters=5, seed=8)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the seed does drive the start vector


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 12), seed=st.integers(0, 10_000))
def test_lanczos_property_random_symmetric(n, seed):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=DT)
    A = 0.5 * (M + M.T)
    true = torch.linalg.eigvalsh(A)[-1].item()
    lam = lanczos_top_eigenvalue(lambda v: A @ v, n, iters=n, seed=seed).item()
    scale = max(1.0, torch.linalg.matrix_norm(A, 2).item())
    assert abs(lam - true) <= 1e-8 * scale


def test_power_iteration_recovers_max_eigenvalue():
    eigs = torch.cat([torch.tensor([10.0, 5.0, -4.0]), torch.linspace(-3, 3, 27)]).to(DT)
    A = sym_with_spectrum(eigs, seed=5)
    lam = power_iteration_top_eigenvalue(lambda v: A @ v, 30, iters=200, tol=1e-12)
    assert lam.dim() == 0
    assert lam.item() == pytest.approx(10.0, rel=1e-6)


def test_power_iteration_negative_dominant_uses_shift():
    # Largest-magnitude eigenvalue is -12; the top (algebraic) one is 4.
    eigs = torch.cat([torch.tensor([-12.0, 4.0]), torch.linspace(-2, 1, 18)]).to(DT)
    A = sym_with_spectrum(eigs, seed=6)
    lam = power_iteration_top_eigenvalue(lambda v: A @ v, 20, iters=500, tol=1e-13)
    assert lam.item() == pytest.approx(4.0, rel=1e-5)


def test_power_iteration_rng_untouched():
    A = sym_with_spectrum(SPECTRUM_30, seed=7)
    before = torch.get_rng_state()
    power_iteration_top_eigenvalue(lambda v: A @ v, 30, iters=10)
    assert torch.equal(torch.get_rng_state(), before)


# --------------------------------------------------------------------------
# Hutchinson trace
# --------------------------------------------------------------------------


def test_hutchinson_exact_on_diagonal():
    d = torch.linspace(-3.0, 5.0, 40, dtype=DT)
    est = hutchinson_trace(lambda v: d * v, 40, samples=3, seed=11)
    assert est.dim() == 0
    assert est.item() == pytest.approx(d.sum().item(), abs=1e-12)


def test_hutchinson_close_to_dense_hessian_trace():
    model, x, y = mlp_setup(0)
    H = dense_hessian(model, lambda out: F.cross_entropy(out, y), x)
    params = list(model.parameters())
    hvp = hvp_fn(lambda: F.cross_entropy(model(x), y), params)
    dim = H.shape[0]
    before = torch.get_rng_state()
    est = hutchinson_trace(hvp, dim, samples=2000, seed=0).item()
    assert torch.equal(torch.get_rng_state(), before)
    # Oracle: exact Hutchinson std from the dense Hessian,
    # Var(z^T H z) = 2 * sum_{i != j} H_ij^2 for Rademacher z.
    off = H - torch.diag(torch.diag(H))
    std = math.sqrt(2.0 * (off**2).sum().item() / 2000)
    true = torch.trace(H).item()
    assert abs(est - true) < 5 * std + 1e-9
    assert abs(est - true) < 0.1 * abs(true) + 1e-6


# --------------------------------------------------------------------------
# HVP and sharpness vs dense Hessians
# --------------------------------------------------------------------------


def test_hvp_matches_dense_hessian_product():
    model, x, y = mlp_setup(1)
    H = dense_hessian(model, lambda out: F.cross_entropy(out, y), x)
    hvp = hvp_fn(lambda: F.cross_entropy(model(x), y), list(model.parameters()))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(H.shape[0], generator=g, dtype=DT)
        torch.testing.assert_close(hvp(v), H @ v, rtol=1e-9, atol=1e-11)


def test_hvp_unused_param_and_float32_vector():
    lin = nn.Linear(3, 1).to(DT)
    unused = nn.Parameter(torch.ones(2, dtype=DT))
    x = torch.randn(4, 3, dtype=DT, generator=torch.Generator().manual_seed(0))
    hvp = hvp_fn(lambda: (lin(x) ** 2).mean(), [lin.weight, lin.bias, unused])
    v = torch.ones(6, dtype=torch.float32)
    out = hvp(v)
    assert out.dtype == torch.float32 and out.shape == (6,)
    assert torch.equal(out[4:], torch.zeros(2))
    with pytest.raises(ValueError):
        hvp(torch.ones(5))


def test_hvp_rejects_non_grad_params():
    p = torch.ones(3, dtype=DT)
    with pytest.raises(ValueError, match="require grad"):
        hvp_fn(lambda: (p**2).sum(), [p])


def test_sharpness_mlp_matches_dense_hessian():
    model, x, y = mlp_setup(2)
    H = dense_hessian(model, lambda out: F.cross_entropy(out, y), x)
    n = sum(p.numel() for p in model.parameters())
    assert 30 <= n <= 100
    true = torch.linalg.eigvalsh(H)[-1]
    lam = sharpness(model, lambda: F.cross_entropy(model(x), y), iters=40)
    assert lam.dim() == 0 and lam.dtype == DT
    torch.testing.assert_close(lam, true, rtol=1e-4, atol=0.0)


def test_sharpness_on_param_list_and_under_no_grad():
    model, x, y = mlp_setup(3)
    H = dense_hessian(model, lambda out: F.cross_entropy(out, y), x)
    true = torch.linalg.eigvalsh(H)[-1]
    with torch.no_grad():
        lam = sharpness(list(model.parameters()), lambda: F.cross_entropy(model(x), y), iters=40)
    torch.testing.assert_close(lam, true, rtol=1e-4, atol=0.0)


def _adam_trained_mlp(amsgrad: bool = False, opt_cls=torch.optim.Adam, steps: int = 5):
    model, x, y = mlp_setup(4)
    opt = opt_cls(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-6, amsgrad=amsgrad)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y, opt


def test_adam_preconditioner_none_before_first_step():
    model, _, _ = mlp_setup(5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    assert adam_preconditioner(opt, list(model.parameters())) is None


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_preconditioner_matches_actual_adam_step(amsgrad, opt_cls):
    """Oracle: Adam's own update is -lr * P^-1 m with the *raw* first moment m (weight decay 0),
    the preconditioned-EMA-momentum form of Cohen et al. 2022 (arXiv 2207.14484)."""
    model, x, y = mlp_setup(4)
    lr, beta1 = 1e-2, 0.9
    opt = opt_cls(
        model.parameters(), lr=lr, betas=(beta1, 0.99), eps=1e-6, amsgrad=amsgrad, weight_decay=0.0
    )
    params = list(model.parameters())
    for _ in range(4):
        before = flat_params(model).clone()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        delta = flat_params(model) - before
    P = adam_preconditioner(opt, params)
    m = torch.cat([opt.state[p]["exp_avg"].reshape(-1) for p in params])
    torch.testing.assert_close(delta, -lr * m / P, rtol=1e-9, atol=1e-14)
    # And the explicit formula (1 - beta1^t) (sqrt(v_hat) + eps), t = 4 steps taken here.
    key = "max_exp_avg_sq" if amsgrad else "exp_avg_sq"
    v = torch.cat([opt.state[p][key].reshape(-1) for p in params])
    torch.testing.assert_close(P, (1 - beta1**4) * ((v / (1 - 0.99**4)).sqrt() + 1e-6))


def test_adam_preconditioner_per_group_eps_and_stateless_params():
    model, x, y = mlp_setup(6)
    opt = torch.optim.Adam(
        [
            {"params": model.fc1.parameters(), "eps": 1e-3},
            {"params": model.fc2.parameters(), "eps": 1e-8},
        ],
        lr=1e-2,
    )
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model.fc2.bias.grad = None  # Adam skips it: no state
    opt.step()
    params = list(model.parameters())
    P = adam_preconditioner(opt, params)
    n1 = model.fc1.weight.numel() + model.fc1.bias.numel()
    v1 = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in params[:2]])
    bc2 = 1 - 0.999
    torch.testing.assert_close(P[:n1], (1 - 0.9) * ((v1 / bc2).sqrt() + 1e-3))
    assert torch.isinf(P[-3:]).all()  # fc2.bias never updated
    assert torch.isfinite(P[:-3]).all()
    stranger = nn.Parameter(torch.ones(2, dtype=DT))
    with pytest.raises(ValueError, match="not in any param group"):
        adam_preconditioner(opt, [stranger])


def test_adam_preconditioner_rejects_non_adam_state():
    model, x, y = mlp_setup(7)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    with pytest.raises(ValueError, match="not Adam-like"):
        adam_preconditioner(opt, list(model.parameters()))


def _precond_reference(opt, params, t: int, second_moment: str = "exp_avg_sq") -> torch.Tensor:
    """P = (1 - beta1^t) (sqrt(v / (1 - beta2^t)) + eps) from the raw state, t counted by the test."""
    group = opt.param_groups[0]
    (b1, b2), eps = group["betas"], group["eps"]
    v = torch.cat([opt.state[p][second_moment].double().reshape(-1) for p in params])
    return (1 - b1**t) * ((v / (1 - b2**t)).sqrt() + eps)


def _top_eig_of_Pinv_H(P: torch.Tensor, H: torch.Tensor) -> float:
    """Largest eigenvalue of the non-symmetric P^-1 H by a dense general eigendecomposition."""
    eig = torch.linalg.eigvals(H / P[:, None])
    assert eig.imag.abs().max() < 1e-8 * eig.real.abs().max()  # similar to a symmetric matrix: real spectrum
    return float(eig.real.max())


@pytest.mark.parametrize("amsgrad", [False, True])
def test_preconditioned_sharpness_matches_dense(amsgrad):
    """Preconditioned sharpness = top eigenvalue of P^-1 H with the bias-corrected P of Cohen et
    al. 2022 (arXiv 2207.14484), at t = 10 where the (1 - beta1^t) factor is 0.65."""
    t = 10
    model, x, y, opt = _adam_trained_mlp(amsgrad=amsgrad, steps=t)
    params = list(model.parameters())
    P = adam_preconditioner(opt, params)
    H_dim = sum(p.numel() for p in params)
    assert P is not None and P.shape == (H_dim,) and 40 <= H_dim <= 100
    H = dense_hessian(model, lambda out: F.cross_entropy(out, y), x)
    assert H.shape == (H_dim, H_dim)
    P_ref = _precond_reference(opt, params, t, "max_exp_avg_sq" if amsgrad else "exp_avg_sq")
    true = _top_eig_of_Pinv_H(P_ref, H)
    lam = sharpness(model, lambda: F.cross_entropy(model(x), y), iters=60, preconditioner=P)
    assert float(lam) == pytest.approx(true, rel=1e-3)
    # The test tells the bias-corrected P from the one without (1 - beta1^t): 1 / 0.65 apart.
    without = _top_eig_of_Pinv_H(P_ref / (1 - 0.9**t), H)
    assert true / without == pytest.approx(1 / (1 - 0.9**t), rel=1e-9) and true / without > 1.5
    # ... and from the plain sharpness.
    plain = torch.linalg.eigvalsh(H)[-1]
    assert abs(true - plain.item()) > 1e-2 * abs(true)
    with pytest.raises(ValueError, match="preconditioner"):
        sharpness(model, lambda: F.cross_entropy(model(x), y), preconditioner=P[:-1])


def _spam(params, **kw):
    """SPAM with the paper's defaults (seismo.mitigate.optimizers), skipped without pytorch-optimizer."""
    pytest.importorskip("pytorch_optimizer")
    from seismo.mitigate.optimizers import spam

    return spam(params, **kw)


def _spam_trained_mlp(steps: int, **kw):
    model, x, y = mlp_setup(4)
    opt = _spam(model.parameters(), lr=1e-2, **kw)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y, opt


def test_preconditioner_of_spam_uses_the_group_step():
    """SPAM keeps t in the param group (no per-parameter 'step') and its moments flattened."""
    t = 10
    model, x, y, opt = _spam_trained_mlp(t)
    params = list(model.parameters())
    assert all("step" not in opt.state[p] for p in params) and opt.param_groups[0]["step"] == t
    P = adam_preconditioner(opt, params)
    torch.testing.assert_close(P, _precond_reference(opt, params, t), rtol=1e-12, atol=0.0)
    H = dense_hessian(model, lambda out: F.cross_entropy(out, y), x)
    lam = sharpness(model, lambda: F.cross_entropy(model(x), y), iters=60, preconditioner=P)
    assert float(lam) == pytest.approx(_top_eig_of_Pinv_H(P, H), rel=1e-3)


def test_preconditioner_of_masked_spam_is_inf_outside_the_mask():
    """SPAM with density < 1 keeps moments for the coordinates of a boolean mask only: the others
    are not moved by the optimizer (P = inf), the masked ones get their moments in mask order."""
    t = 3
    model, x, y, opt = _spam_trained_mlp(t, density=0.5)
    params = list(model.parameters())
    P = adam_preconditioner(opt, params)
    (b1, b2), eps = opt.param_groups[0]["betas"], opt.param_groups[0]["eps"]
    pos = 0
    for p in params:
        st = opt.state[p]
        want = torch.full((p.numel(),), math.inf, dtype=DT)
        mask = st.get("mask")
        idx = mask.reshape(-1).nonzero().reshape(-1) if mask is not None else torch.arange(p.numel())
        for k, i in enumerate(idx.tolist()):
            v = float(st["exp_avg_sq"].reshape(-1)[k])
            want[i] = (1 - b1**t) * (math.sqrt(v / (1 - b2**t)) + eps)
        assert mask is None or 0 < int(mask.sum()) < p.numel()
        torch.testing.assert_close(P[pos : pos + p.numel()], want, rtol=1e-12, atol=0.0)
        pos += p.numel()
    assert torch.isinf(P).any() and torch.isfinite(P).any()


# --------------------------------------------------------------------------
# Scaled dot-product attention (double backward through SDPA)
# --------------------------------------------------------------------------


class TinyAttn(nn.Module):
    def __init__(self, d: int = 4, n_cls: int = 3):
        super().__init__()
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.out = nn.Linear(d, n_cls)

    def forward(self, x):
        h = F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x), is_causal=True)
        return self.out(h.mean(dim=1))


def manual_attn_forward(pd, x):
    """Independent reference: explicit softmax attention, same parameters."""
    def lin(name, t):
        return t @ pd[f"{name}.weight"].T + pd[f"{name}.bias"]

    q, k, v = lin("q", x), lin("k", x), lin("v", x)
    T = x.shape[1]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    h = torch.softmax(scores, dim=-1) @ v
    return lin("out", h.mean(dim=1))


def test_sharpness_through_sdpa_matches_dense_hessian():
    torch.manual_seed(8)
    model = TinyAttn().to(DT)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(6, 5, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (6,), generator=g)
    # The reference forward really is the same function.
    pd = dict(model.named_parameters())
    torch.testing.assert_close(manual_attn_forward(pd, x), model(x))
    H = dense_hessian(model, lambda out: F.cross_entropy(out, y), x, forward=manual_attn_forward)
    true = torch.linalg.eigvalsh(H)[-1]
    lam = sharpness(model, lambda: F.cross_entropy(model(x), y), iters=60)
    torch.testing.assert_close(lam, true, rtol=1e-4, atol=0.0)


# --------------------------------------------------------------------------
# Observation must not perturb
# --------------------------------------------------------------------------


class NoisyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


def _snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    grad_ids = [id(p.grad) for p in model.parameters()]
    bufs = [b.clone() for b in model.buffers()]
    state = {
        (i, k): (v.clone() if torch.is_tensor(v) else v)
        for i, p in enumerate(model.parameters())
        for k, v in opt.state[p].items()
    }
    modes = [m.training for m in model.modules()]
    return params, grads, grad_ids, bufs, state, modes


@pytest.mark.parametrize("train_mode", [True, False])
def test_sharpness_does_not_perturb_training(train_mode):
    torch.manual_seed(10)
    model = NoisyNet().to(DT)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(16, 5, generator=g, dtype=DT)
    y = torch.randint(0, 3, (16,), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    # Leave non-trivial grads in place (as in the middle of a training step).
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model.train(train_mode)
    model.fc2.eval()  # mixed per-module modes must survive too

    def loss_fn():
        return F.cross_entropy(model(x), y)

    # Sanity: the loss closure really would perturb RNG and BN buffers.
    if train_mode:
        rng0 = torch.get_rng_state()
        rm0 = model.bn.running_mean.clone()
        with torch.no_grad():
            loss_fn()
        assert not torch.equal(torch.get_rng_state(), rng0)
        assert not torch.equal(model.bn.running_mean, rm0)
        torch.set_rng_state(rng0)
        with torch.no_grad():
            model.bn.running_mean.copy_(rm0)
            model.bn.num_batches_tracked.sub_(1)

    params0, grads0, grad_ids0, bufs0, state0, modes0 = _snapshot(model, opt)
    rng0 = torch.get_rng_state()

    P = adam_preconditioner(opt, list(model.parameters()))
    lam = sharpness(model, loss_fn, iters=10, preconditioner=P)
    lam_plain = sharpness(model, loss_fn, iters=10)
    assert torch.isfinite(lam) and torch.isfinite(lam_plain)

    params1, grads1, grad_ids1, bufs1, state1, modes1 = _snapshot(model, opt)
    assert torch.equal(torch.get_rng_state(), rng0)
    assert all(torch.equal(a, b) for a, b in zip(params0, params1))
    assert all(torch.equal(a, b) for a, b in zip(grads0, grads1))
    assert grad_ids0 == grad_ids1
    assert all(torch.equal(a, b) for a, b in zip(bufs0, bufs1))
    assert state0.keys() == state1.keys()
    for k in state0:
        a, b = state0[k], state1[k]
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b
    assert modes0 == modes1


def test_sharpness_does_not_create_grads():
    model, x, y = mlp_setup(12)
    assert all(p.grad is None for p in model.parameters())
    sharpness(model, lambda: F.cross_entropy(model(x), y), iters=3)
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------
# Stability thresholds, tied to the actual optimizer dynamics
# --------------------------------------------------------------------------


def test_gd_on_quadratic_diverges_iff_lr_exceeds_two_over_lambda():
    eigs = torch.cat([torch.tensor([6.0]), torch.linspace(0.1, 3.0, 19)]).to(DT)
    A = sym_with_spectrum(eigs, seed=13)
    x0 = torch.randn(20, dtype=DT, generator=torch.Generator().manual_seed(14))
    probe = nn.Parameter(x0.clone())
    lam = sharpness([probe], lambda: 0.5 * probe @ A @ probe, iters=20).item()
    assert lam == pytest.approx(6.0, rel=1e-8)
    for factor, should_diverge in [(1.9, False), (2.1, True)]:
        p = nn.Parameter(x0.clone())
        opt = torch.optim.SGD([p], lr=factor / lam)
        predicted_unstable = lam > stability_threshold(opt)
        assert predicted_unstable == should_diverge
        for _ in range(200):
            opt.zero_grad()
            (0.5 * p @ A @ p).backward()
            opt.step()
        ratio = (p.detach().norm() / x0.norm()).item()
        if should_diverge:
            assert ratio > 1e6
        else:
            assert ratio < 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(momentum=0.9),
        dict(momentum=0.9, nesterov=True),
        dict(momentum=0.5, dampening=0.3),
    ],
)
def test_momentum_thresholds_match_pytorch_sgd_dynamics(kwargs):
    lam = 4.0
    for factor, should_diverge in [(0.9, False), (1.1, True)]:
        # Choose lr so that lam = factor * threshold(lr).
        probe_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0, **kwargs)
        lr = factor * stability_threshold(probe_opt) / lam
        p = nn.Parameter(torch.tensor([1.0], dtype=DT))
        opt = torch.optim.SGD([p], lr=lr, **kwargs)
        assert (lam > stability_threshold(opt)) == should_diverge
        for _ in range(400):
            opt.zero_grad()
            (0.5 * lam * p**2).sum().backward()
            opt.step()
        if should_diverge:
            assert abs(p.item()) > 1e6
        else:
            assert abs(p.item()) < 1e-3


def test_stability_threshold_values():
    p = [nn.Parameter(torch.zeros(1))]
    lr = 0.05
    assert stability_threshold(torch.optim.SGD(p, lr=lr)) == pytest.approx(2 / lr)
    assert stability_threshold(torch.optim.SGD(p, lr=lr, momentum=0.9)) == pytest.approx(3.8 / lr)
    assert stability_threshold(torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True)) == (
        pytest.approx(3.8 / 2.8 / lr)
    )
    assert stability_threshold(torch.optim.AdamW(p, lr=lr, betas=(0.9, 0.999))) == pytest.approx(
        38 / lr
    )
    assert stability_threshold(torch.optim.Adam(p, lr=lr, betas=(0.8, 0.999))) == pytest.approx(
        3.6 / 0.2 / lr
    )
    # First param group's lr is used.
    q = [nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": p, "lr": 0.1}, {"params": q, "lr": 1.0}], lr=0.5)
    assert stability_threshold(opt) == pytest.approx(20.0)


@pytest.mark.parametrize("beta1", [0.9, 0.95])
@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_threshold_is_the_derived_formula(opt_cls, beta1):
    """Cohen et al. 2022 (arXiv 2207.14484): (2 + 2 beta1) / ((1 - beta1) lr): 38/lr at 0.9, 78/lr at 0.95."""
    lr = 3e-3
    opt = opt_cls([nn.Parameter(torch.zeros(1))], lr=lr, betas=(beta1, 0.999))
    assert has_stability_threshold(opt)
    assert stability_threshold(opt) == pytest.approx({0.9: 38.0, 0.95: 78.0}[beta1] / lr, rel=1e-12)


def _other_optimizers(p):
    yield torch.optim.NAdam(p, lr=0.1, betas=(0.9, 0.999))
    yield torch.optim.RAdam(p, lr=0.1)
    yield torch.optim.Adamax(p, lr=0.1)
    yield torch.optim.RMSprop(p, lr=0.1)
    try:
        import pytorch_optimizer  # noqa: F401 - the optim extra
    except ImportError:  # pragma: no cover - without the optim extra
        return
    from seismo.mitigate.optimizers import lamb, spam, stable_spam

    yield from (lamb(p), spam(p), stable_spam(p))


def test_no_threshold_where_none_is_derived():
    """NAdam, RAdam, LAMB, SPAM, ... have betas but no derived threshold: none is made up."""
    p = [nn.Parameter(torch.zeros(1))]
    for opt in _other_optimizers(p):
        assert not has_stability_threshold(opt), type(opt).__name__
        with pytest.raises(ValueError, match="no stability threshold is derived"):
            stability_threshold(opt)
    with pytest.raises(ValueError, match="lr"):
        stability_threshold(torch.optim.SGD(p, lr=0.0))


@pytest.mark.parametrize("kind", ["adamw", "nadam", "spam"])
def test_curvature_probe_precond_sharpness_and_threshold(kind):
    """Through the Monitor, at t = 10: max_eig_precond is the top eigenvalue of P^-1 H (dense,
    bias-corrected P from the raw state) within 0.1%. AdamW gets (2 + 2 beta1)/((1 - beta1) lr);
    NAdam and SPAM, without a derived threshold, get none (the edge-of-stability detector, which
    needs hessian/threshold, stays quiet) but still record both eigenvalues."""
    t, lr = 10, 1e-2
    model, x, y = mlp_setup(9)
    if kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.0)
    elif kind == "nadam":
        opt = torch.optim.NAdam(model.parameters(), lr=lr)
    else:
        opt = _spam(model.parameters(), lr=lr)
    dim = sum(p.numel() for p in model.parameters())
    probe = CurvatureProbe(lambda m: F.cross_entropy(m(x), y), schedule=lambda s: s == t - 1, iters=dim)
    mon = Monitor(model, opt, probes=[probe], flush_every=1)
    for _ in range(t):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(loss)
    assert not mon.disabled
    H = dense_hessian(model, lambda out: F.cross_entropy(out, y), x)
    P = _precond_reference(opt, list(model.parameters()), t=t)
    assert mon.series("hessian/max_eig_precond")[1] == [pytest.approx(_top_eig_of_Pinv_H(P, H), rel=1e-3)]
    assert mon.series("hessian/max_eig")[1] == [pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-3)]
    if kind == "adamw":
        assert mon.series("hessian/threshold")[1] == [pytest.approx(38 / lr, rel=1e-6)]
    else:
        assert "hessian/threshold" not in mon.history
    mon.close()
