"""Bounded cost at scale: a >= 100M-parameter GPT trained for a few steps with the ``full`` preset.

The monitor's own tensors (every tensor reachable from the Monitor and its probes, sinks and
pending records that is not a parameter, a gradient or optimizer state) must stay <= 1% of the
parameters' memory between steps. The UpdateProbe's transient copy of the weights (taken in the
optimizer's pre-step hook, released in its post-step hook) is not state: it is checked to be gone.
Marked ``slow`` (about a minute on 2 CPU cores): ``pytest -m slow tests/monitor/test_scale.py``.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn

from seismo.monitor import Monitor
from seismo.proxy.model import GPTConfig, TinyGPT

BIG = GPTConfig(vocab_size=50304, block_size=64, n_layer=12, n_head=12, n_embd=768)


def reachable_tensors(root: object, exclude: set[int]) -> dict[int, int]:
    """Bytes per storage of every tensor reachable from ``root`` through attributes and containers
    (modules, optimizers and storages in ``exclude`` are not entered or counted)."""
    seen: set[int] = set()
    found: dict[int, int] = {}
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (nn.Module, torch.optim.Optimizer, str, bytes, int, float, type)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in exclude and obj.device.type != "meta":
                found[storage.data_ptr()] = storage.nbytes()
            continue
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith(("seismo", "collections")):
            stack.extend(vars(obj).values())
        elif hasattr(obj, "__slots__") and type(obj).__module__.startswith("seismo"):
            stack.extend(getattr(obj, s) for s in obj.__slots__ if hasattr(obj, s))
    return found


def test_reachable_tensors_counts_a_probe_buffer():
    class Holder:  # a stand-in for a probe: one own buffer, one view of a parameter
        pass
    Holder.__module__ = "seismo.test"
    p = nn.Parameter(torch.zeros(1000))
    h = Holder()
    h.state = {"buf": [torch.zeros(250)], "view": p.detach()}
    found = reachable_tensors(h, exclude={p.untyped_storage().data_ptr()})
    assert sum(found.values()) == 250 * 4


@pytest.mark.slow
def test_full_preset_state_is_under_one_percent_of_a_124m_gpt():
    torch.manual_seed(0)
    model = TinyGPT(BIG)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params >= 100_000_000
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    mon = Monitor(model, opt, probes="full", flush_every=2)
    worst = 0
    t0 = time.perf_counter()
    for step in range(3):
        tok = torch.randint(0, BIG.vocab_size, (1, BIG.block_size + 1), generator=torch.Generator().manual_seed(step))
        _, loss = model(tok[:, :-1], tok[:, 1:])
        loss.backward()
        opt.step()
        mon.step(loss)  # before zero_grad: the gradients are still there and excluded below
        exclude = {t.untyped_storage().data_ptr() for p in model.parameters() for t in (p, p.grad) if t is not None}
        exclude |= {v.untyped_storage().data_ptr() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)}
        state = sum(reachable_tensors(mon, exclude).values())
        worst = max(worst, state)
        opt.zero_grad(set_to_none=True)
    mon.close()
    elapsed = time.perf_counter() - t0
    print(f"\nparams {n_params / 1e6:.1f}M ({param_bytes / 2**20:.0f} MiB); monitor state max {worst / 2**10:.1f} KiB "
          f"= {100 * worst / param_bytes:.4f}% of the parameters; {len(mon.history)} signals; 3 steps in {elapsed:.0f} s")
    assert len(mon.history) > 100  # the full preset really ran: per-module signals recorded
    assert any(n.startswith("attn/logit_max/") for n in mon.history)
    assert worst <= 0.01 * param_bytes


def test_thousands_of_modules_are_reported_round_robin():
    """2,000 Linear modules, per-module signals for at most 512 per step: every module is reported
    once in 4 tracked steps, each norm equal to torch's own norm of that module's gradient."""
    from seismo.errors import ConfigError
    from seismo.monitor.gradients import MAX_MODULES_PER_STEP, GradientProbe

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(2000)])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the same gradients every step
    mon = Monitor(model, opt, probes="minimal", flush_every=1)
    x = torch.randn(3, 2)
    per_step = []
    for _ in range(4):
        model(x).square().sum().backward()
        opt.step()
        record = mon.step()
        per_step.append({n for n in record if n.startswith("grad/norm/")})
        if len(per_step) < 4:
            opt.zero_grad(set_to_none=True)
    mon.close()
    assert all(len(s) == MAX_MODULES_PER_STEP for s in per_step)
    assert len(set().union(*per_step)) == 2000  # 4 x 512 >= 2000: every module reported
    for i in (0, 777, 1999):
        want = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in model[i].parameters()])).item()
        got = mon.history[f"grad/norm/{i}"][1][-1]
        assert abs(got - want) <= 1e-6 * want
    with pytest.raises(ConfigError, match="max_modules"):
        GradientProbe(max_modules=0)
