"""The Monitor on wrapped optimizers and models, with the real wrapper classes where installed:
Accelerate's ``AcceleratedOptimizer`` (through ``Accelerator.prepare``), Lightning's
``LightningOptimizer``, ``ZeroRedundancyOptimizer`` and DDP (in a 1-process gloo group) and
``torch.compile``. The recorded gradient and update norms must equal those the test computes from
the parameters itself; anything that is not an optimizer is one ConfigError naming its type."""

from __future__ import annotations

import math
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from seismo.errors import ConfigError
from seismo.monitor import Monitor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 3


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def batch(step: int):
    g = torch.Generator().manual_seed(900 + step)
    return torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g)


def run(model, opt, mon, params, backward=None):
    """Train; return the gradient norms and update norms the loop measured itself."""
    grads, updates = [], []
    for step in range(STEPS):
        x, y = batch(step)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        (backward or (lambda t: t.backward()))(loss)
        grads.append(math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params)))
        before = [p.detach().clone() for p in params]
        opt.step()
        updates.append(math.sqrt(sum(float((p.detach().double() - b.double()).pow(2).sum()) for p, b in zip(params, before))))
        mon.step(loss)
    mon.close()
    return grads, updates


def check(mon, grads, updates):
    assert not mon.disabled, mon.disabled
    assert mon.series("grad/norm")[1] == pytest.approx(grads, rel=1e-5)
    assert mon.series("update/norm")[1] == pytest.approx(updates, rel=1e-5)


def test_accelerated_optimizer_from_accelerator_prepare():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState, GradientState

    try:
        acc = accelerate.Accelerator(cpu=True)
        model = mlp()
        model, opt = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
        assert isinstance(opt, AcceleratedOptimizer)
        mon = Monitor(model, opt, probes="default", every=1, flush_every=1)
        assert mon.optimizer is opt.optimizer
        params = list(model.parameters())
        grads, updates = run(model, opt, mon, params, backward=acc.backward)
        mon.disabled.pop("attn", None), mon.disabled.pop("act", None)  # an MLP has neither
        check(mon, grads, updates)
        assert len(mon.series("adam/v_max")[0]) == STEPS  # the Adam probe reads the inner optimizer's state
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def test_lightning_optimizer():
    pl = pytest.importorskip("lightning.pytorch", reason="lightning is not installed (extra: lightning)")
    model = mlp()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = pl.core.optimizer.LightningOptimizer(inner)
    mon = Monitor(model, opt, probes="default", every=1, flush_every=1)
    assert mon.optimizer is inner
    # Lightning's strategy ends in the inner optimizer's step(), where the probes' hooks sit
    grads, updates = run(model, inner, mon, list(model.parameters()))
    mon.disabled.pop("attn", None), mon.disabled.pop("act", None)  # an MLP has neither
    check(mon, grads, updates)
    assert len(mon.series("adam/v_max")[0]) == STEPS


@pytest.fixture
def one_process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_zero_redundancy_optimizer_and_ddp_model(one_process_group):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = mlp()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=torch.optim.SGD, lr=0.1, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Adam probe is off for SGD, with its warning
        mon = Monitor(ddp, opt, probes="default", every=1, flush_every=1)
    assert mon.model is model and mon.optimizer is opt
    grads, updates = run(ddp, opt, mon, list(model.parameters()))
    for name in ("attn", "act", "adam"):
        mon.disabled.pop(name, None)
    check(mon, grads, updates)


def test_compiled_model_is_unwrapped():
    model = mlp()
    compiled = torch.compile(model)  # compiles lazily: nothing is compiled unless it is called
    mon = Monitor(compiled, torch.optim.SGD(model.parameters(), lr=0.1), probes="minimal")
    assert mon.model is model
    mon.close()


@pytest.mark.parametrize(
    ("optimizer", "type_name"),
    [
        ("adam", "builtins.str"),
        (nn.Linear(2, 2), "torch.nn.modules.linear.Linear"),
        (torch.optim.lr_scheduler.StepLR(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1), 1), "torch.optim.lr_scheduler.StepLR"),
    ],
)
def test_anything_that_is_not_an_optimizer_is_one_config_error_naming_its_type(optimizer, type_name):
    with pytest.raises(ConfigError) as info:
        Monitor(mlp(), optimizer)
    msg = str(info.value)
    assert msg.startswith("optimizer: ") and msg.endswith(type_name) and "\n" not in msg
