"""seismo.mitigate.optimizers against small hand-written references of each paper's update rule.

Every reference below is written from the paper / METHODS.md (sections 3, 4, 11), in float64.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

pytest.importorskip("pytorch_optimizer")

from seismo.mitigate import optimizers as O  # noqa: E402

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


SHAPES = [(4, 3), (5,)]


def init_params():
    return [randn(s, seed=i) for i, s in enumerate(SHAPES)]


def grads_at(t, spikes=()):
    scale = 1000.0 if t in spikes else 1.0
    return [scale * randn(s, seed=1000 + 10 * t + i) for i, s in enumerate(SHAPES)]


def run_library(opt_fn, steps, spikes=(), grad_fn=None):
    params = [torch.nn.Parameter(p) for p in init_params()]
    opt = opt_fn(params)
    traj = []
    for t in range(steps):
        grads = grads_at(t, spikes) if grad_fn is None else grad_fn(t, params)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        traj.append([p.detach().clone() for p in params])
    return traj, opt


def assert_traj_close(a, b, rtol=1e-10, atol=1e-12, upto=None):
    for t, (xa, xb) in enumerate(zip(a, b)):
        if upto is not None and t >= upto:
            break
        for pa, pb in zip(xa, xb):
            torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol, msg=f"step {t}")


# --- SPAM ----------------------------------------------------------------------------------------


def spam_reference(steps, lr, betas, eps, threshold, gap, warmup, accu, spikes=()):
    """Official SPAM (METHODS.md 3.2): reset, spike clip, Adam, cosine warm-up after each reset."""
    b1, b2 = betas
    ps = init_params()
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    total, current, k = 0, warmup + 1, 0
    traj, clipped = [], 0
    for t in range(steps):
        c = current
        scale = 1.0 if c >= warmup else 1.0 - 0.99 * (1 + math.cos(math.pi * c / (warmup + 1))) / 2
        k += 1
        for i, g in enumerate(grads_at(t, spikes)):
            if (total + 1) % gap == 0:
                m[i], v[i] = torch.zeros_like(g), torch.zeros_like(g)
            cur = total + 1
            if cur >= accu and cur % gap >= accu:
                mask = g**2 > threshold * v[i]
                clipped += int(mask.sum())
                g = torch.where(mask, g.sign() * (threshold * v[i]).sqrt(), g)
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            step = lr * math.sqrt(1 - b2**k) / (1 - b1**k)
            ps[i] = ps[i] - step * scale * m[i] / (v[i].sqrt() + eps)
        total += 1
        current += 1
        if (total + 1) % gap == 0:
            current = 0
        traj.append([p.clone() for p in ps])
    return traj, clipped


SPAM_SMALL = dict(lr=1e-2, threshold=50, update_proj_gap=30, warmup_epoch=10, grad_accu_steps=5)
SPIKES = (12, 20, 47, 66)


def test_spam_matches_the_official_rule_through_two_resets():
    steps = 70
    ref, clipped = spam_reference(steps, 1e-2, (0.9, 0.999), 1e-6, 50, 30, 10, 5, SPIKES)
    assert clipped > 0  # the spikes were clipped
    lib, _ = run_library(lambda p: O.spam(p, **SPAM_SMALL), steps, SPIKES)
    assert_traj_close(lib, ref)


def test_spam_library_warmup_is_shifted_by_one_step_after_a_reset():
    steps = 40
    ref, _ = spam_reference(steps, 1e-2, (0.9, 0.999), 1e-6, 50, 30, 10, 5, SPIKES)
    raw, _ = run_library(lambda p: O.spam(p, exact_warmup=False, **SPAM_SMALL), steps, SPIKES)
    assert_traj_close(raw, ref, upto=29)  # identical until the first reset (step index 29)
    with pytest.raises(AssertionError):
        assert_traj_close(raw, ref)


def test_spam_warmup_multipliers():
    got = [round(O.spam_warmup_multiplier(c, 150), 5) for c in (0, 1, 2, 75, 149, 150, 400)]
    assert got == [0.01000, 0.01011, 0.01043, 0.49985, 0.99957, 1.0, 1.0]
    from pytorch_optimizer.optimizer.spam import CosineDecay

    decay = CosineDecay(0.99, 150)  # the library's: called with c = 0, 1, 2, ... after a reset
    lib = [1.0 - decay.get_death_rate(c) for c in range(150)]
    assert round(lib[0], 5) == 0.01011
    assert lib[:-1] == pytest.approx([O.spam_warmup_multiplier(c + 1, 150) for c in range(149)], abs=1e-12)


def test_spam_paper_defaults():
    opt = O.spam([torch.nn.Parameter(torch.zeros(3, 2))])
    assert (opt.warmup_epoch, opt.threshold, opt.update_proj_gap, opt.grad_accu_steps) == (150, 5000, 500, 20)
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (1e-3, (0.9, 0.999), 1e-6, 0.0)
    assert type(opt).__name__ == "SPAM" and opt.warmup.get_death_rate(0) == pytest.approx(0.99)
    opt.load_state_dict(opt.state_dict())


# --- Stable-SPAM ---------------------------------------------------------------------------------


def stable_spam_reference(steps, lr, betas, eps, g1, g2, g3, wd, spikes):
    """Stable-SPAM before its first reset (METHODS.md 4): decay, AdaClip, AdaGN, Adam; s = 1."""
    b1, b2 = betas
    ps = init_params()
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    m_max, m_n, v_n = [0.0] * 2, [0.0] * 2, [0.0] * 2
    traj, clipped = [], 0
    for k in range(1, steps + 1):
        for i, g in enumerate(grads_at(k - 1, spikes)):
            ps[i] = ps[i] * (1 - lr * wd)
            big = g.abs().max()
            m_max[i] = g3 * m_max[i] + (1 - g3) * big
            m_hat = m_max[i] / (1 - g3**k)
            mask = g.abs() > m_hat
            clipped += int(mask.sum())
            g = torch.where(mask, g / big * m_hat, g)  # AdaClip
            n = g.norm()
            m_n[i] = g1 * m_n[i] + (1 - g1) * n
            v_n[i] = g2 * v_n[i] + (1 - g2) * n * n
            c = (m_n[i] / (1 - g1**k)) / ((v_n[i] / (1 - g2**k)).sqrt() + eps)
            g = g / n * c  # AdaGN
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            ps[i] = ps[i] - lr / (1 - b1**k) * m[i] / (v[i].sqrt() / math.sqrt(1 - b2**k) + eps)
        traj.append([p.clone() for p in ps])
    return traj, clipped


def test_stable_spam_adaclip_adagn_match_the_paper_before_the_first_reset():
    steps, spikes = 30, (6, 15, 22)
    ref, clipped = stable_spam_reference(steps, 1e-2, (0.9, 0.999), 1e-8, 0.7, 0.9, 0.999, 0.1, spikes)
    assert clipped > 0
    lib, opt = run_library(lambda p: O.stable_spam(p, lr=1e-2, weight_decay=0.1), steps, spikes)
    assert_traj_close(lib, ref)
    assert (opt.gamma1, opt.gamma2, opt.theta, opt.update_proj_gap) == (0.7, 0.9, 0.999, 1000)
    assert opt.param_groups[0]["eps"] == 1e-8


# --- AdaBelief -----------------------------------------------------------------------------------


def adabelief_reference(steps, lr, betas, eps, wd):
    b1, b2 = betas
    ps = init_params()
    m = [torch.zeros_like(p) for p in ps]
    s = [torch.zeros_like(p) for p in ps]
    traj = []
    for k in range(1, steps + 1):
        for i, g in enumerate(grads_at(k - 1)):
            ps[i] = ps[i] * (1 - lr * wd)  # decoupled decay
            m[i] = b1 * m[i] + (1 - b1) * g
            s[i] = b2 * s[i] + (1 - b2) * (g - m[i]) ** 2 + eps
            ps[i] = ps[i] - lr / (1 - b1**k) * m[i] / (s[i].sqrt() / math.sqrt(1 - b2**k) + eps)
        traj.append([p.clone() for p in ps])
    return traj


@pytest.mark.parametrize("eps", [1e-16, 1e-2])
def test_adabelief_matches_the_paper(eps):
    ref = adabelief_reference(8, 1e-2, (0.9, 0.999), eps, 0.05)
    lib, _ = run_library(lambda p: O.adabelief(p, lr=1e-2, eps=eps, weight_decay=0.05), 8)
    assert_traj_close(lib, ref)
    assert O.adabelief([torch.nn.Parameter(torch.zeros(2))]).param_groups[0]["eps"] == 1e-16


# --- AdamP ---------------------------------------------------------------------------------------


def _abs_cos(x, y):
    return (x * y).sum(1).abs() / (x.norm(dim=1) * y.norm(dim=1))


def adamp_step(p, g, m, v, k, lr, betas, eps, wd, delta, wd_ratio, eps_mode):
    b1, b2 = betas
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    bc1, bc2 = 1 - b1**k, 1 - b2**k
    e = eps if eps_mode == "paper" else eps / math.sqrt(bc2)
    perturb = m / (v.sqrt() / math.sqrt(bc2) + e)
    ratio = 1.0
    if p.dim() > 1:
        for rows in (p.shape[0], 1):  # channel view, then layer view
            pv, gv = p.reshape(rows, -1), g.reshape(rows, -1)
            if _abs_cos(gv, pv).max() < delta / math.sqrt(pv.shape[1]):
                pn = pv / (pv.norm(dim=1, keepdim=True) + eps)
                uv = perturb.reshape(rows, -1)
                perturb = (uv - pn * (pn * uv).sum(1, keepdim=True)).reshape(p.shape)
                ratio = wd_ratio
                break
    p = p * (1 - lr * wd * ratio)
    return p - lr / bc1 * perturb, m, v, ratio


def adamp_grad(t, params):
    """Gradients orthogonal (row-wise) to the current weight for the matrix: the scale-invariant case."""
    w = params[0].detach()
    r = randn(w.shape, seed=500 + t)
    g0 = r - (r * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True) * w
    return [g0, randn(params[1].shape, seed=600 + t)]


# paper placement of eps: off by ~6e-8 (eps / sqrt(1 - beta2^t) vs eps); library placement: exact
@pytest.mark.parametrize(
    "eps, eps_mode, tol", [(1e-8, "paper", 2e-7), (1e-8, "library", 1e-12), (1e-3, "library", 1e-12)]
)
def test_adamp_projects_scale_invariant_weights_as_in_the_paper(eps, eps_mode, tol):
    lr, wd, steps = 1e-2, 0.1, 6
    lib, _ = run_library(lambda p: O.adamp(p, lr=lr, weight_decay=wd, eps=eps), steps, grad_fn=adamp_grad)
    ps = [torch.nn.Parameter(p) for p in init_params()]
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    for k in range(1, steps + 1):
        grads = adamp_grad(k - 1, ps)
        for i, g in enumerate(grads):
            new, m[i], v[i], ratio = adamp_step(ps[i].detach(), g, m[i], v[i], k, lr, (0.9, 0.999), eps, wd,
                                                0.1, 0.1, eps_mode)
            if i == 0:
                assert ratio == 0.1  # the projection branch ran
            ps[i] = torch.nn.Parameter(new)
        for a, b in zip(lib[k - 1], ps):
            torch.testing.assert_close(a, b.detach(), rtol=0, atol=tol)


def test_adamp_library_eps_placement_is_the_documented_deviation():
    lr, steps = 1e-2, 3
    lib, _ = run_library(lambda p: O.adamp(p, lr=lr, eps=1e-3), steps, grad_fn=adamp_grad)
    ps = [p.clone() for p in init_params()]
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    ps[1], m[1], v[1], _ = adamp_step(ps[1], adamp_grad(0, ps)[1], m[1], v[1], 1, lr, (0.9, 0.999), 1e-3, 0.0,
                                      0.1, 0.1, "paper")
    assert (lib[0][1] - ps[1]).abs().max() > 1e-6


# --- diffGrad ------------------------------------------------------------------------------------


def test_diffgrad_matches_the_paper():
    lr, b1, b2, eps, steps = 1e-2, 0.9, 0.999, 1e-8, 8
    lib, _ = run_library(lambda p: O.diffgrad(p, lr=lr), steps)
    ps = init_params()
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    prev = [torch.zeros_like(p) for p in ps]
    for k in range(1, steps + 1):
        for i, g in enumerate(grads_at(k - 1)):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            xi = torch.sigmoid((prev[i] - g).abs())  # friction
            m_hat, v_hat = m[i] / (1 - b1**k), v[i] / (1 - b2**k)
            ps[i] = ps[i] - lr * xi * m_hat / (v_hat.sqrt() + eps / math.sqrt(1 - b2**k))
            prev[i] = g
        for a, b in zip(lib[k - 1], ps):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# --- LAMB ----------------------------------------------------------------------------------------


def lamb_reference(steps, lr, betas, eps, wd, grad_scale=1.0):
    """LAMB, You et al. 2020, Algorithm 2, with phi(z) = min(z, 10)."""
    b1, b2 = betas
    ps = init_params()
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    traj = []
    for k in range(1, steps + 1):
        for i, g in enumerate(grads_at(k - 1)):
            g = g * grad_scale
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            r = (m[i] / (1 - b1**k)) / ((v[i] / (1 - b2**k)).sqrt() + eps) + wd * ps[i]
            wn, rn = min(ps[i].norm().item(), 10.0), r.norm().item()
            ratio = wn / rn if wn > 0 and rn > 0 else 1.0
            ps[i] = ps[i] - lr * ratio * r
        traj.append([p.clone() for p in ps])
    return traj


def _scaled(scale):
    return lambda t, params: [scale * g for g in grads_at(t)]


@pytest.mark.parametrize("eps, tol", [(1e-6, 2e-7), (1e-13, 1e-11)])
def test_lamb_matches_the_paper_without_weight_decay(eps, tol):
    # the library adds eps to sqrt(v), the paper to sqrt(v_hat): ~5e-8 apart at eps 1e-6, nothing at 1e-13
    ref = lamb_reference(10, 1e-2, (0.9, 0.999), eps, 0.0, grad_scale=10.0)
    lib, opt = run_library(lambda p: O.lamb(p, lr=1e-2, eps=eps), 10, grad_fn=_scaled(10.0))
    assert_traj_close(lib, ref, rtol=0, atol=tol)
    opt = O.lamb([torch.nn.Parameter(torch.zeros(2))])
    g = opt.param_groups[0]
    assert (g["weight_decouple"], g["adam_debias"], g["eps"]) == (False, True, 1e-6)


def test_lamb_first_step_has_the_papers_size_and_the_raw_library_is_10x():
    import pytorch_optimizer

    w0 = init_params()[0]
    sizes = {}
    makers = {"seismo": O.lamb, "raw": lambda p, **kw: pytorch_optimizer.Lamb(p, weight_decouple=False, **kw)}
    for name, make in makers.items():
        p = torch.nn.Parameter(w0.clone())
        opt = make([p], lr=1e-2)
        p.grad = randn(w0.shape, seed=7)
        opt.step()
        sizes[name] = ((p.detach() - w0).norm() / (1e-2 * w0.norm())).item()
    assert sizes["seismo"] == pytest.approx(1.0, rel=1e-5)  # lr * phi(||w||) as in the paper
    assert sizes["raw"] == pytest.approx(10.0, rel=1e-5)  # 1 / (1 - beta1)


def test_lamb_weight_decay_weighting_is_the_documented_deviation():
    ref = lamb_reference(5, 1e-2, (0.9, 0.999), 1e-6, 0.1)
    lib, _ = run_library(lambda p: O.lamb(p, lr=1e-2, weight_decay=0.1), 5)
    delta_ref = ref[-1][0] - init_params()[0]
    delta_lib = lib[-1][0] - init_params()[0]
    assert (delta_lib - delta_ref).norm() > 1e-3 * delta_ref.norm()


# --- reset_moments, orthograd, errors ------------------------------------------------------------


def test_reset_moments_zeroes_adam_moments_and_keeps_the_step():
    b1, b2, lr = 0.9, 0.999, 1e-3
    p = torch.nn.Parameter(torch.zeros(3, dtype=DT))
    opt = torch.optim.Adam([p], lr=0.0, betas=(b1, b2), eps=1e-12)
    for t in range(4000):
        p.grad = randn(3, seed=t)
        opt.step()
    assert O.reset_moments(opt) == 2
    st = opt.state[p]
    assert not st["exp_avg"].any() and not st["exp_avg_sq"].any() and int(st["step"]) == 4000
    g = torch.tensor([0.3, -2.0, 5.0], dtype=DT)
    p.grad = g.clone()
    opt.param_groups[0]["lr"] = lr
    opt.step()
    k = 4001
    expected = -lr * ((1 - b1) / (1 - b1**k)) / math.sqrt((1 - b2) / (1 - b2**k)) * g.sign()
    torch.testing.assert_close(p.detach(), expected, rtol=1e-9, atol=0)
    assert (p.detach().abs() / lr).tolist() == pytest.approx([3.162 * math.sqrt(1 - b2**k)] * 3, rel=1e-3)


def test_reset_moments_on_library_optimizers_keeps_their_other_state():
    params = [torch.nn.Parameter(p) for p in init_params()]
    ab, ss = O.adabelief(params), O.stable_spam(params)
    for t in range(3):
        for p, g in zip(params, grads_at(t)):
            p.grad = g
        ab.step()
        ss.step()
    assert O.reset_moments(ab) == 4  # exp_avg, exp_avg_var per parameter
    assert all(not s["exp_avg_var"].any() for s in ab.state.values())
    m_max = [s["m_max_t"].clone() for s in ss.state.values()]
    assert O.reset_moments(ss) == 4
    assert all(torch.equal(a, s["m_max_t"]) for a, s in zip(m_max, ss.state.values()))


def test_orthograd_wrapper_steps_along_the_perpendicular_gradient():
    w0, g = randn((4, 5), seed=1), randn((4, 5), seed=2) + 0.5 * randn((4, 5), seed=1)
    p = torch.nn.Parameter(w0.clone())
    opt = O.orthograd(torch.optim.SGD([p], lr=1.0))
    p.grad = g.clone()
    opt.step()
    step = (w0 - p.detach()).flatten()
    assert abs(step @ w0.flatten()) < 1e-10 * step.norm() * w0.norm()
    torch.testing.assert_close(step.norm(), g.norm(), rtol=1e-10, atol=0)


def test_unknown_arguments_are_rejected():
    with pytest.raises(TypeError, match="warmup_steps"):
        O.spam([torch.nn.Parameter(torch.zeros(2))], warmup_steps=150)  # the official name, not the library's


def test_missing_library_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)
    with pytest.raises(ImportError, match=r"pip install 'seismo\[optim\]'"):
        O.adabelief([torch.nn.Parameter(torch.zeros(2))])


def test_spam_threshold_matched_to_beta2():
    """One clipped coordinate multiplies v by beta2 + (1 - beta2) * theta (SPAM's clip to sqrt(theta v))."""
    assert O.spam_threshold_for_beta2(0.999) == pytest.approx(5000.0)
    th = O.spam_threshold_for_beta2(0.95)
    assert th == pytest.approx((0.999 + 0.001 * 5000 - 0.95) / 0.05) and round(th) == 101
    # check the inflation factor by running the library's SPAM on one coordinate
    for beta2, theta in ((0.999, 5000.0), (0.95, th)):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = O.spam([p], lr=1e-3, betas=(0.9, beta2), threshold=theta)
        for _ in range(30):  # clipping is active from step N_a = 20 on
            p.grad = torch.ones(1)
            opt.step()
        v_before = opt.state[p]["exp_avg_sq"].clone()
        p.grad = torch.full((1,), 1e6)  # a x1e6 spike: clipped to sqrt(theta * v)
        opt.step()
        assert float(opt.state[p]["exp_avg_sq"] / v_before) == pytest.approx(0.999 + 0.001 * 5000, rel=1e-4)
    with pytest.raises(ValueError):
        O.spam_threshold_for_beta2(1.0)


def test_train_passes_the_spam_threshold():
    from seismo.proxy.model import ConfigError, TinyGPT
    from seismo.proxy.presets import get_preset
    from seismo.proxy.train import build_optimizer

    cfg = get_preset("tiny")
    cfg.optim.name, cfg.optim.spam_threshold = "spam", 101.0
    opt = build_optimizer(TinyGPT(cfg.model), cfg.optim)
    assert opt.threshold == 101.0
    cfg.optim.spam_threshold = -1.0
    with pytest.raises(ConfigError, match="spam_threshold"):
        cfg.validate()
