"""Unit tests for seismo.mitigate.transforms against the formulas (and torch's own clipping)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from seismo.mitigate import transforms as T

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def randn(*shape, seed=0, dtype=DT):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3))


def grad_copy(model):
    """A twin of the model's parameters whose .grad are copies (deepcopy does not copy .grad)."""
    twins = []
    for p in model.parameters():
        t = p.detach().clone().requires_grad_(True)
        t.grad = p.grad.clone()
        twins.append(t)
    return twins


def backward(model, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 6, generator=g)
    y = torch.randn(16, 3, generator=g)
    model.zero_grad()
    (scale * (model(x) - y).pow(2).mean()).backward()


# --- clip_by_global_norm ------------------------------------------------------------------------


@pytest.mark.parametrize("max_norm", [0.05, 1.0, 1e3])
def test_global_norm_clip_equals_torch_clip_grad_norm(max_norm):
    model = tiny_model()
    backward(model, seed=1)
    ref = grad_copy(model)
    total = torch.nn.utils.clip_grad_norm_(ref, max_norm)

    params = list(model.parameters())
    tx = T.clip_by_global_norm(max_norm)
    out, state = tx.update([p.grad for p in params], tx.init(params), params)
    assert torch.allclose(T.global_norm([p.grad for p in params]), total, rtol=1e-6)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r.grad, rtol=1e-6, atol=0)
    assert int(state.clipped) == int(total > max_norm)


def test_attach_writes_clipped_grads_in_place():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    T.attach(opt, T.clip_by_global_norm(0.1))
    backward(model, seed=1)
    ids = [id(p.grad) for p in model.parameters()]
    ref = grad_copy(model)
    torch.nn.utils.clip_grad_norm_(ref, 0.1)
    opt.step()
    assert ids == [id(p.grad) for p in model.parameters()]
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=0)


def test_clip_by_value_clamps_and_counts():
    g = [torch.tensor([-3.0, 0.5, 2.0]), torch.tensor(0.1)]
    tx = T.clip_by_value(1.0)
    out, s = tx.update(g, tx.init(g), g)
    assert out[0].tolist() == [-1.0, 0.5, 1.0] and out[1].item() == pytest.approx(0.1)
    out, s = tx.update([torch.zeros(3), torch.tensor(0.2)], s, g)
    assert (int(s.count), int(s.clipped)) == (2, 1)


# --- clip_per_coordinate -------------------------------------------------------------------------


def per_coordinate_reference(stream, k, beta, warmup):
    """Slow per-coordinate loop in Python floats, straight from the documented rule."""
    n = len(stream[0])
    nu = [0.0] * n
    outs, clipped = [], []
    for t, g in enumerate(stream):
        out, hits = [], 0
        for i, gi in enumerate(g):
            nu_hat = nu[i] / (1 - beta**t) if t > 0 else 0.0
            limit = k * math.sqrt(nu_hat)
            if t >= warmup and nu_hat > 0 and abs(gi) > limit:
                gi = math.copysign(limit, gi)
                hits += 1
            nu[i] = beta * nu[i] + (1 - beta) * gi * gi
            out.append(gi)
        outs.append(out)
        clipped.append(hits)
    return outs, clipped


def test_clip_per_coordinate_matches_reference_through_a_spike():
    k, beta, warmup = 3.0, 0.9, 5
    stream = [randn(4, seed=s) for s in range(12)]
    stream[3] = stream[3] * 10  # during warm-up: passes
    stream[8] = stream[8] * 1000  # after warm-up: clipped
    stream[6][2] = 0.0
    tx = T.clip_per_coordinate(k, beta, warmup)
    state = tx.init([stream[0]])
    ref, ref_hits = per_coordinate_reference([s.tolist() for s in stream], k, beta, warmup)
    for t, g in enumerate(stream):
        (out,), state = tx.update([g], state, [g])
        torch.testing.assert_close(out, torch.tensor(ref[t], dtype=DT), rtol=1e-12, atol=0)
        assert int(state.last_clipped) == ref_hits[t]
    assert ref_hits[3] == 0 and ref_hits[8] == 4
    assert int(state.clipped) == sum(h > 0 for h in ref_hits)


def test_clip_per_coordinate_leaves_never_seen_coordinates_alone():
    tx = T.clip_per_coordinate(k=2.0, warmup=1)
    p = torch.zeros(2)
    state = tx.init([p])
    for _ in range(3):
        _, state = tx.update([torch.tensor([1.0, 0.0])], state, [p])
    (out,), state = tx.update([torch.tensor([1.0, 5.0])], state, [p])
    assert out.tolist() == [1.0, 5.0]  # coordinate 1 had nu = 0: not clipped to 0 (SPAM would)


# --- adaptive_gradient_clipping ------------------------------------------------------------------


def agc_reference(g, w, clip, eps):
    g = g.clone()
    rows = [...] if w.dim() <= 1 else range(w.shape[0])
    for i in rows:
        wn = max(w[i].norm().item(), eps)
        gn = g[i].norm().item()
        if gn / wn > clip:
            g[i] = g[i] * (clip * wn / gn)
    return g


def test_agc_matches_hand_written_reference():
    w = [randn(6, 4, seed=1), randn(3, 2, 3, 3, seed=2), randn(6, seed=3), torch.tensor(0.5, dtype=DT)]
    w[0][2] = 1e-5  # a row below eps: ||W||* = eps
    g = [randn(*p.shape, seed=10 + i) * s for i, (p, s) in enumerate(zip(w, [0.05, 0.02, 0.001, 1.0]))]
    clip, eps = 0.05, 1e-3
    tx = T.adaptive_gradient_clipping(clip, eps)
    out, state = tx.update(g, tx.init(w), w)
    for o, gi, wi in zip(out, g, w):
        torch.testing.assert_close(o, agc_reference(gi, wi, clip, eps), rtol=1e-12, atol=0)
    units = 6 + 3 + 1 + 1
    assert 0 < int(state.last_clipped) < units  # some units clipped, some not
    changed = [not torch.equal(o, gi) for o, gi in zip(out, g)]
    assert changed[0] and not changed[2]


def test_agc_exclude_leaves_a_parameter_untouched():
    w, g = randn(3, 4, seed=1), randn(3, 4, seed=2) * 100
    (out,), _ = T.adaptive_gradient_clipping(exclude=[w]).update([g], T.adaptive_gradient_clipping().init([w]), [w])
    assert torch.equal(out, g)


# --- zscore_norm_clip ----------------------------------------------------------------------------


def test_zscore_clips_a_x1000_spike_without_inflating_the_history():
    window, z = 20, 3.0
    p = [torch.zeros(50, dtype=DT)]
    tx = T.zscore_norm_clip(window=window, z=z)
    state = tx.init(p)
    accepted = []
    for s in range(30):
        g = [randn(50, seed=s)]
        (out,), state = tx.update(g, state, p)
        assert torch.equal(out, g[0])  # normal steps pass untouched
        accepted.append(g[0].norm().item())
    hist = torch.tensor(accepted[-window:], dtype=DT)
    thr = hist.mean() + z * hist.std()

    spike = [randn(50, seed=99) * 1000]
    (out,), state = tx.update(spike, state, p)
    torch.testing.assert_close(out.norm(), thr, rtol=1e-12, atol=0)
    torch.testing.assert_close(state.threshold, thr, rtol=1e-12, atol=0)
    assert int(state.clipped) == 1
    assert state.history.max() < 2 * hist.max()  # the spike stayed out of the history

    nxt = [randn(50, seed=100) * 1.3]  # a normal (slightly large) step right after
    assert nxt[0].norm() < thr
    (out,), state = tx.update(nxt, state, p)
    assert torch.equal(out, nxt[0]) and int(state.clipped) == 1


def test_zscore_is_inactive_until_min_history_and_ignores_nonfinite_norms():
    p = [torch.zeros(8)]
    tx = T.zscore_norm_clip(window=10, z=2.0, min_history=5)
    state = tx.init(p)
    for s in range(4):
        _, state = tx.update([randn(8, seed=s, dtype=torch.float32)], state, p)
    big = [randn(8, seed=50, dtype=torch.float32) * 1e4]
    (out,), state = tx.update(big, state, p)
    assert torch.equal(out, big[0]) and int(state.filled) == 5  # 4 values were too few
    _, state = tx.update([torch.full((8,), float("nan"))], state, p)
    assert int(state.filled) == 5 and torch.isfinite(state.history).all()


def test_zscore_record_clipped_adds_the_threshold():
    p = [torch.zeros(4, dtype=DT)]
    tx = T.zscore_norm_clip(window=5, z=1.0, min_history=3, record_clipped=True)
    state = tx.init(p)
    for s in range(3):
        _, state = tx.update([randn(4, seed=s)], state, p)
    _, state = tx.update([randn(4, seed=9) * 1e3], state, p)
    assert int(state.filled) == 4 and state.history[3] == state.threshold


# --- skip_if_nonfinite ---------------------------------------------------------------------------


def test_skip_if_nonfinite_zeroes_everything_and_raises_the_flag():
    tx = T.skip_if_nonfinite()
    p = [torch.zeros(3), torch.zeros(2)]
    state = tx.init(p)
    out, state = tx.update([torch.ones(3), torch.tensor([1.0, float("inf")])], state, p)
    assert all(torch.equal(o, torch.zeros_like(o)) for o in out)
    assert bool(state.last_skipped) and int(state.skipped) == 1
    out, state = tx.update([torch.ones(3), torch.ones(2)], state, p)
    assert torch.equal(out[0], torch.ones(3)) and not bool(state.last_skipped) and int(state.skipped) == 1


def test_skip_if_nonfinite_is_not_a_true_skip_for_adam():
    """The documented caveat: with Adam, zero gradients still move the parameters."""
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    T.attach(opt, T.skip_if_nonfinite())
    backward(model, seed=1)
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    backward(model, seed=2)
    next(model.parameters()).grad[0, 0] = float("nan")
    opt.step()
    assert bool(T.state_of(opt, "skip_if_nonfinite").last_skipped)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


# --- orthogonalize -------------------------------------------------------------------------------


def test_orthogonalize_is_perpendicular_norm_preserving_and_matches_the_formula():
    w = [randn(5, 4, seed=1), randn(7, seed=2)]
    g = [randn(5, 4, seed=3) + 0.7 * w[0], randn(7, seed=4) - 2.0 * w[1]]
    tx = T.orthogonalize()
    out, _ = tx.update(g, tx.init(w), w)
    for o, gi, wi in zip(out, g, w):
        wf, gf = wi.flatten(), gi.flatten()
        perp = gf - (wf @ gf) / (wf @ wf + 1e-30) * wf
        ref = perp * gf.norm() / (perp.norm() + 1e-30)
        torch.testing.assert_close(o.flatten(), ref, rtol=1e-12, atol=1e-15)
        assert abs(o.flatten() @ wf) < 1e-12 * gf.norm() * wf.norm()
        torch.testing.assert_close(o.norm(), gi.norm(), rtol=1e-12, atol=0)


def test_orthogonalize_float32():
    w, g = randn(64, seed=1, dtype=torch.float32), randn(64, seed=2, dtype=torch.float32)
    (o,), _ = T.orthogonalize().update([g], T.orthogonalize().init([w]), [w])
    assert o.dtype == torch.float32
    assert abs(float(o @ w)) < 1e-5 * float(g.norm() * w.norm())
    assert float(o.norm()) == pytest.approx(float(g.norm()), rel=1e-6)


# --- measure -------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [100.0, 1e-3])
def test_measure_records_the_norm_before_and_after_the_clip(scale):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    handle = T.attach(opt, T.chain(T.measure("pre"), T.clip_by_global_norm(1.0), T.measure("post")))
    assert float(T.measured(opt, "pre")) == 0.0
    backward(model, seed=1, scale=scale)
    raw = T.global_norm([p.grad for p in model.parameters()])
    opt.step()
    pre, post = T.measured(opt, "pre"), T.measured(handle, "post")
    assert pre.dim() == 0 and torch.equal(pre, raw)
    torch.testing.assert_close(post, torch.clamp(pre, max=1.0), rtol=1e-5, atol=0)
    torch.testing.assert_close(post, T.global_norm([p.grad for p in model.parameters()]), rtol=1e-6, atol=0)
    assert int(T.state_of(opt, "pre").count) == 1


def test_state_of_errors_are_clear():
    opt = torch.optim.SGD(tiny_model().parameters(), lr=0.1)
    T.attach(opt, T.chain(T.measure("a"), T.clip_by_global_norm(), T.measure("a")))
    with pytest.raises(KeyError, match="2 attached"):
        T.measured(opt, "a")
    with pytest.raises(KeyError, match="no attached"):
        T.measured(opt, "zzz")
    with pytest.raises(KeyError, match="not a measure"):
        T.measured(opt, "clip_by_global_norm")


# --- attach: state dict, remove, keys, None grads ------------------------------------------------


def make_run(seed=0):
    model = tiny_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    tx = T.chain(
        T.skip_if_nonfinite(),
        T.zscore_norm_clip(window=8, z=1.0, min_history=3),
        T.clip_per_coordinate(k=2.0, beta=0.9, warmup=2),
        T.clip_by_global_norm(0.5),
    )
    return model, opt, T.attach(opt, tx)


def train(model, opt, steps):
    for s in steps:
        backward(model, seed=s, scale=50.0 if s % 7 == 3 else 1.0)
        opt.step()


def test_save_load_roundtrip_reproduces_the_trajectory_exactly():
    model, opt, handle = make_run()
    train(model, opt, range(12))
    assert int(T.state_of(opt, "zscore_norm_clip").clipped) > 0  # the state matters
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, range(12, 24))

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, opt2, handle2 = make_run(seed=123)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    train(model2, opt2, range(12, 24))
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)

    # control: the same resume without the transform state takes another path
    model3, opt3, _ = make_run(seed=123)
    model3.load_state_dict(ckpt["model"])
    del ckpt["opt"][T.STATE_DICT_KEY]
    with pytest.warns(UserWarning, match="no state for transform"):
        opt3.load_state_dict(ckpt["opt"])
    train(model3, opt3, range(12, 24))
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), model3.parameters()))


def test_load_rejects_a_mismatched_state():
    _, opt, _ = make_run()
    sd = opt.state_dict()
    other = torch.optim.AdamW(tiny_model().parameters(), lr=1e-3)
    T.attach(other, T.chain(T.measure("m")))
    with pytest.raises(ValueError, match="transform state"):
        other.load_state_dict(sd)


def test_remove_detaches_and_keys_are_unique():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    handle = T.attach(opt, T.clip_by_value(1e-3))
    with pytest.raises(ValueError, match="already attached"):
        T.attach(opt, T.measure(), key="transforms")
    second = T.attach(opt, T.measure("after"), key="monitor")  # runs after the first
    backward(model, seed=1, scale=100.0)
    opt.step()
    assert float(T.measured(opt, "after")) <= 1.0001e-3 * math.sqrt(sum(p.numel() for p in model.parameters()))
    assert set(opt.state_dict()[T.STATE_DICT_KEY]) == {"transforms", "monitor"}
    handle.remove()
    second.remove()
    backward(model, seed=1, scale=100.0)
    raw = [p.grad.clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(r, p.grad) for r, p in zip(raw, model.parameters()))
    assert T.STATE_DICT_KEY not in opt.state_dict()
    T.attach(opt, T.measure())  # the key is free again


def test_params_without_grad_keep_none_and_add_nothing():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    T.attach(opt, T.chain(T.measure("n"), T.clip_by_global_norm(1e-3)))
    backward(model, seed=1)
    last = list(model.parameters())[-1]
    last.grad = None
    norm = T.global_norm([p.grad for p in model.parameters() if p.grad is not None])
    opt.step()
    assert last.grad is None and torch.equal(T.measured(opt, "n"), norm)


def test_add_param_group_after_attach_is_an_error():
    model = tiny_model()
    opt = torch.optim.SGD(list(model.parameters())[:2], lr=0.1)
    T.attach(opt, T.clip_by_global_norm())
    opt.add_param_group({"params": list(model.parameters())[2:]})
    backward(model, seed=1)
    with pytest.raises(RuntimeError, match="add_param_group"):
        opt.step()
