"""Adam-state signals against a slow, element-by-element reference.

Oracle: for every coordinate, from the raw optimizer state the step just wrote (``exp_avg``, and
``exp_avg_sq`` or, with amsgrad, ``max_exp_avg_sq``), the group's betas/eps and the number of steps
the test itself has taken (t, counted here, never read from the optimizer):

    r = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)          (Kingma & Ba 2015, arXiv 1412.6980)

in Python floats; then per module update_rms = sqrt(mean r^2), ratio_std = population std of r,
ratio_bimodal = fraction |r| > 0.9, eps_dominated = fraction sqrt(v_hat) < eps, and over all
parameters update_grad_cos = r.g / (|r| |g|) with the gradient the step left in .grad. The optimizers
keep t in different places (torch: per-parameter state tensor; pytorch-optimizer's SPAM and
Stable-SPAM: an int in the param group), which is what the probe must get right.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from seismo.monitor import AdamProbe, Monitor
from seismo.monitor.adam import adam_step_count, bias_corrections

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRACKED = (1, 2, 50)  # optimizer steps (t) at which the signals are checked
MARGIN = 1e-4  # no coordinate this close (relatively) to a threshold, so float32 rounding cannot flip a count


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _optimizer(kind: str, params):
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-4, weight_decay=0.1)
    if kind == "adam_amsgrad":
        return torch.optim.Adam(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-4, amsgrad=True)
    pytest.importorskip("pytorch_optimizer")
    from seismo.mitigate.optimizers import spam, stable_spam

    if kind == "spam":  # the paper's defaults (eps 1e-6, reset every 500 steps, clipping from step 20)
        return spam(params)
    if kind == "spam_masked":  # sparse momentum: moments only for a random half of each matrix, flattened
        return spam(params, density=0.5)
    if kind == "stable_spam":  # eps 1e-8, gradients renormalised before the moments
        return stable_spam(params)
    raise AssertionError(kind)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input columns spread over six decades (so some weights' gradients sit below eps and others far
    above it), and larger inputs for the first 10 steps (so amsgrad's running max differs from v)."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 6, generator=g) * torch.tensor([1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-6])
    if step < 10:
        x = 3 * x
    return x, torch.randint(0, 3, (16,), generator=g)


def reference(opt: torch.optim.Optimizer, model: nn.Module, t: int) -> dict[str, float]:
    """The four per-module signals and the global cosine between r and the gradient, coordinate
    by coordinate in Python floats. Moments kept over a boolean `mask` only (SPAM) pair with the
    gradient's masked coordinates, in row-major order."""
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    per_module: dict[str, tuple[list[float], list[float], float]] = {}
    dot = r_sq = g_sq = 0.0
    for name, p in model.named_parameters():
        group, st = group_of[id(p)], opt.state[p]
        b1, b2 = (float(b) for b in group["betas"])
        eps = float(group["eps"])
        v_key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
        ms, vs = st["exp_avg"].double().reshape(-1).tolist(), st[v_key].double().reshape(-1).tolist()
        grad = p.grad.double()
        gs = (grad[st["mask"]] if "mask" in st else grad).reshape(-1).tolist()
        assert len(gs) == len(ms)
        rs, svs = per_module.setdefault(name.rsplit(".", 1)[0], ([], [], eps))[:2]
        for m, v, g in zip(ms, vs, gs):
            sv = math.sqrt(v / (1.0 - b2**t))
            r = (m / (1.0 - b1**t)) / (sv + eps)
            rs.append(r)
            svs.append(sv)
            dot, r_sq, g_sq = dot + r * g, r_sq + r * r, g_sq + g * g
    out = {"adam/update_grad_cos": dot / math.sqrt(r_sq * g_sq)}
    for mod, (rs, svs, eps) in per_module.items():
        n = len(rs)
        mean = sum(rs) / n
        mean_sq = sum(r * r for r in rs) / n
        for r in rs:
            assert abs(abs(r) - 0.9) > MARGIN * 0.9, "a coordinate sits on the bimodal threshold"
        for sv in svs:
            assert abs(sv - eps) > MARGIN * eps, "a coordinate sits on the eps threshold"
        out[f"adam/update_rms/{mod}"] = math.sqrt(mean_sq)
        out[f"adam/ratio_std/{mod}"] = math.sqrt(sum((r - mean) ** 2 for r in rs) / n)
        out[f"adam/ratio_bimodal/{mod}"] = sum(abs(r) > 0.9 for r in rs) / n
        out[f"adam/eps_dominated/{mod}"] = sum(sv < eps for sv in svs) / n
    return out


class GainNet(Net):
    """Net with a 0-d parameter (a scalar gain, as sigmaReparam's) in fc1."""

    def __init__(self):
        super().__init__()
        self.fc1.register_parameter("gain", nn.Parameter(torch.tensor(1.0)))

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x) * self.fc1.gain))


def run(kind: str, seed: int = 0, steps: int = max(TRACKED), net: type[nn.Module] = Net):
    torch.manual_seed(seed)
    model = net()
    opt = _optimizer(kind, model.parameters())
    mon = Monitor(model, opt, probes=[AdamProbe(schedule=lambda s: s + 1 in TRACKED)], flush_every=1)
    refs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a probe failure warns: it must not happen
        for s in range(steps):
            x, y = _batch(s)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss)
            if s + 1 in TRACKED:
                refs[s + 1] = reference(opt, model, t=s + 1)
    assert not mon.disabled
    got = {t: {k: mon.series(k)[1][mon.series(k)[0].index(t - 1)] for k in ref} for t, ref in refs.items()}
    mon.close()
    return opt, model, refs, got


@pytest.mark.parametrize("kind", ["adamw", "adam_amsgrad", "spam", "spam_masked", "stable_spam"])
def test_adam_signals_equal_elementwise_reference(kind):
    opt, model, refs, got = run(kind)
    if kind.startswith("spam"):  # the layout under test: 2-D weights' moments flattened over a boolean mask
        assert all(opt.state[p]["exp_avg"].dim() == 1 < p.dim() for p in (model.fc1.weight, model.fc2.weight))
        assert all(opt.state[p]["mask"].all() == (kind == "spam") for p in (model.fc1.weight, model.fc2.weight))
    saw = {name: False for name in ("bimodal", "not_bimodal", "eps_dominated", "not_eps_dominated")}
    for t, ref in refs.items():
        assert set(got[t]) == set(ref) and len(ref) == 4 * 2 + 1
        for key, want in ref.items():
            assert got[t][key] == pytest.approx(want, rel=1e-5, abs=1e-12), (kind, t, key)
            if "/ratio_bimodal/" in key:
                saw["bimodal"] |= want > 0
                saw["not_bimodal"] |= want < 1
            if "/eps_dominated/" in key:
                saw["eps_dominated"] |= want > 0
                saw["not_eps_dominated"] |= want < 1
    if kind != "stable_spam":  # Stable-SPAM rescales every gradient to its running norm: nothing is below eps
        assert all(saw.values()), saw  # the fractions are not trivially 0 or 1
    else:
        assert saw["bimodal"] and saw["not_bimodal"], saw


def test_a_scalar_parameter_keeps_the_probe_on_and_exact():
    """A 0-d moment divided by the 0-d float64 bias correction promoted to float64 and the probe's
    float32 accumulation refused it: the probe switched itself off on any model with a scalar gain."""
    _, _, refs, got = run("adamw", net=GainNet)  # run() turns a probe warning into an error
    for t, ref in refs.items():
        for key, want in ref.items():
            assert got[t][key] == pytest.approx(want, rel=1e-5, abs=1e-12), (t, key)


def test_spam_bias_correction_uses_the_group_step():
    """The issue-14 bug: SPAM keeps no per-parameter `step`, so a default t = 1 inflated update_rms
    (0.328 instead of 0.230 at step 50 in the reported run). The reference with t = 1 must differ
    from the correct one by far more than the test's tolerance, so this test can tell them apart."""
    opt, model, refs, got = run("spam")
    assert all("step" not in opt.state[p] for p in model.parameters())
    assert opt.param_groups[0]["step"] == 50
    wrong = reference(opt, model, t=1)
    for key in refs[50]:
        if "/update_rms/" in key:
            assert wrong[key] / refs[50][key] > 1.3, key  # sqrt(0.1)/0.1 * sqrt(1-0.999^50)/(1-0.9^50) = 1.43
            assert got[50][key] == pytest.approx(refs[50][key], rel=1e-5)


def test_amsgrad_reads_the_running_max():
    """With amsgrad the update divides by max_exp_avg_sq; the test is only meaningful if it differs."""
    opt, model, refs, got = run("adam_amsgrad")
    p = model.fc1.weight
    assert not torch.allclose(opt.state[p]["max_exp_avg_sq"], opt.state[p]["exp_avg_sq"], rtol=0.1)


def test_stable_spam_step_restarts_at_momentum_reset():
    """Stable-SPAM sets the group step back to 1 at its momentum reset (every update_proj_gap
    steps) and zeroes the moments; the probe must bias-correct with the restarted count."""
    pytest.importorskip("pytorch_optimizer")
    from seismo.mitigate.optimizers import stable_spam

    torch.manual_seed(0)
    model = Net()
    opt = stable_spam(model.parameters(), update_proj_gap=4)
    mon = Monitor(model, opt, probes=[AdamProbe(schedule=lambda s: True)], flush_every=1)
    for s in range(6):
        x, y = _batch(20 + s)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(loss)
        t = s + 1 if s + 1 < 4 else s + 1 - 3  # steps 1 2 3 | reset to 1 at the 4th step: 1 2 3
        assert opt.param_groups[0]["step"] == t  # the library's own bookkeeping, as described above
        ref = reference(opt, model, t=t)
        for key, want in ref.items():
            assert mon.series(key)[1][-1] == pytest.approx(want, rel=1e-5, abs=1e-12), (s, key)
    mon.close()


class _NoStepAdam(torch.optim.Optimizer):
    """Adam-shaped state (exp_avg, exp_avg_sq, betas, eps) but no step count anywhere."""

    def __init__(self, params):
        super().__init__(params, dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                st.setdefault("exp_avg", torch.zeros_like(p)).lerp_(p.grad, 0.1)
                st.setdefault("exp_avg_sq", torch.zeros_like(p)).mul_(0.999).addcmul_(p.grad, p.grad, value=0.001)


def test_no_step_count_disables_the_probe_with_a_warning():
    model = Net()
    opt = _NoStepAdam(model.parameters())
    mon = Monitor(model, opt, probes=[AdamProbe(schedule=lambda s: True)], flush_every=1)
    x, y = _batch(0)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    with pytest.warns(RuntimeWarning, match="step"):
        opt.step()
        mon.step(loss)
    assert "adam" in mon.disabled
    assert not any(k.startswith("adam/") for k in mon.history)
    mon.close()


def test_step_count_and_bias_corrections_by_hand():
    assert adam_step_count({"step": torch.tensor(7.0)}, {"step": 3}) == 7  # per-parameter wins
    assert adam_step_count({}, {"step": 3}) == 3
    assert adam_step_count({}, {}) is None
    for step in (5, 5.0, torch.tensor(5.0)):
        bc1, bc2 = bias_corrections(step, 0.9, 0.95)
        assert float(bc1) == pytest.approx(1 - 0.9**5, rel=1e-12) and float(bc2) == pytest.approx(1 - 0.95**5, rel=1e-12)
