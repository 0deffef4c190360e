"""One contract over every registered gradient transform (seismo.mitigate.transforms.REGISTRY).

Each transform, built with its defaults, must: keep gradient shapes and dtypes, keep its state's
structure, shapes and dtypes across updates, never sync with the host inside ``update``, never
mutate its inputs, stay finite on all-zero gradients, be deterministic, and survive an
``optimizer.state_dict()`` round trip through ``torch.save``/``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from seismo.mitigate import transforms as T

NAMES = sorted(T.REGISTRY)
CASES = NAMES + ["chain_of_all"]
DTYPES = [torch.float32, torch.float64]
SHAPES = [(5, 3), (5,), (), (2, 3, 2, 2)]  # matrix, vector, scalar, conv kernel


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make(name: str) -> T.GradientTransform:
    if name == "chain_of_all":
        return T.chain(*(T.REGISTRY[n]() for n in NAMES))
    return T.REGISTRY[name]()


def make_params(dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]


def grad_stream(dtype: torch.dtype, n: int, seed: int = 1) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        scale = 1000.0 if i == n - 2 else 1.0  # one spike near the end
        out.append([scale * torch.randn(s, generator=g, dtype=dtype) for s in SHAPES])
    return out


def leaves(state) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, (tuple, list)):
        return [x for s in state for x in leaves(s)]
    raise TypeError(f"state leaf of type {type(state).__name__}; states must hold tensors only")


def structure(state):
    if isinstance(state, torch.Tensor):
        return (tuple(state.shape), state.dtype, state.device)
    return (type(state), tuple(structure(s) for s in state))


def run(tx, params, stream):
    state = tx.init(params)
    outs = []
    for grads in stream:
        g, state = tx.update(grads, state, params)
        outs.append(g)
    return outs, state


@contextlib.contextmanager
def no_host_sync():
    def boom(*args, **kwargs):
        raise AssertionError("host sync inside a transform update")

    names = ["item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy"]
    saved = {n: torch.Tensor.__dict__.get(n) for n in names}
    for n in names:
        setattr(torch.Tensor, n, boom)
    try:
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                delattr(torch.Tensor, n)
            else:
                setattr(torch.Tensor, n, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", CASES)
def test_shapes_dtypes_and_state_structure(name, dtype):
    tx, params = make(name), make_params(dtype)
    state0 = tx.init(params)
    assert all(isinstance(x, torch.Tensor) for x in leaves(state0))
    outs, state = run(tx, params, grad_stream(dtype, 6))
    for out in outs:
        assert [(o.shape, o.dtype) for o in out] == [(p.shape, p.dtype) for p in params]
    assert structure(state) == structure(state0)
    assert hasattr(state0, "_fields")
    if name != "chain_of_all":
        assert int(state.count) == 6


@pytest.mark.parametrize("name", CASES)
def test_update_never_syncs_with_host(name):
    tx, params = make(name), make_params(torch.float32)
    state = tx.init(params)
    with no_host_sync():
        for grads in grad_stream(torch.float32, 4):
            _, state = tx.update(grads, state, params)
    with pytest.raises(AssertionError, match="host sync"), no_host_sync():
        torch.ones(()).item()  # the guard itself works


@pytest.mark.parametrize("name", CASES)
def test_update_does_not_mutate_inputs(name):
    tx, params = make(name), make_params(torch.float32)
    state = tx.init(params)
    stream = grad_stream(torch.float32, 3)
    for grads in stream[:2]:
        _, state = tx.update(grads, state, params)
    grads = stream[2]
    before = [t.clone() for t in leaves(state) + grads + params]
    tx.update(grads, state, params)
    after = leaves(state) + grads + params
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", CASES)
def test_zero_gradients_stay_finite(name, dtype):
    tx, params = make(name), make_params(dtype)
    zeros = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    outs, state = run(tx, params, zeros)
    assert all(torch.isfinite(o).all() for out in outs for o in out)
    assert all(torch.equal(o, torch.zeros_like(o)) for o in outs[-1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", CASES)
def test_deterministic(name, dtype):
    params, stream = make_params(dtype), grad_stream(dtype, 5)
    outs_a, state_a = run(make(name), params, stream)
    outs_b, state_b = run(make(name), params, stream)
    assert all(torch.equal(a, b) for x, y in zip(outs_a, outs_b) for a, b in zip(x, y))
    assert all(torch.equal(a, b) for a, b in zip(leaves(state_a), leaves(state_b)))


def _sgd(dtype):
    params = [torch.nn.Parameter(p) for p in make_params(dtype)]
    return params, torch.optim.SGD(params, lr=0.01)


def _step(params, opt, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", CASES)
def test_state_survives_optimizer_state_dict_roundtrip(name, dtype):
    stream = grad_stream(dtype, 6)
    params_a, opt_a = _sgd(dtype)
    handle_a = T.attach(opt_a, make(name))
    for grads in stream[:4]:
        _step(params_a, opt_a, grads)
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    params_b, opt_b = _sgd(dtype)
    with torch.no_grad():
        for pb, pa in zip(params_b, params_a):
            pb.copy_(pa)
    handle_b = T.attach(opt_b, make(name))
    opt_b.load_state_dict(saved)
    assert structure(handle_b.state) == structure(handle_a.state)
    assert all(torch.equal(a, b) for a, b in zip(leaves(handle_a.state), leaves(handle_b.state)))

    for grads in stream[4:]:
        _step(params_a, opt_a, grads)
        _step(params_b, opt_b, grads)
        assert all(torch.equal(a.grad, b.grad) for a, b in zip(params_a, params_b))
        assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))


def test_the_sync_guard_catches_a_python_branch():
    def update(grads, state, params):
        if grads[0].norm() > 1:  # a host sync: bool(tensor)
            grads = [g / 2 for g in grads]
        return grads, state

    bad = T.GradientTransform(lambda params: T.OrthogonalizeState(torch.zeros((), dtype=torch.int64)), update, "bad")
    params = make_params(torch.float32)
    with pytest.raises(AssertionError, match="host sync"), no_host_sync():
        bad.update(grad_stream(torch.float32, 1)[0], bad.init(params), params)
