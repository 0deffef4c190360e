"""Where the Guard's events go (event sinks, logging, a failing sink), and the wrapped models and
optimizers it accepts (Accelerate, torch.compile, ZeroRedundancyOptimizer; anything else is a
one-line ConfigError naming the type)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from seismo.errors import ConfigError
from seismo.events import Event, EventSink
from seismo.mitigate.guard import Guard, GuardWarning

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def run(guard: Guard, model, n: int = 80, bad=range(40, 60)) -> None:
    for i in guard.steps(n):
        g = torch.Generator().manual_seed(1000 + i)
        x = torch.randn(16, 8, generator=g)
        loss = F.mse_loss(model(x), x.sum(1, keepdim=True).sin()) * (1000.0 if i in bad else 1.0)
        loss.backward()
        guard.step(loss)


class ListSink:
    def __init__(self):
        self.batches: list[list[Event]] = []
        self.flushed = 0

    def write_events(self, events):
        self.batches.append(list(events))

    def flush(self):
        self.flushed += 1


class BrokenSink:
    def __init__(self):
        self.calls = 0

    def write_events(self, events):
        self.calls += 1
        raise OSError("the dashboard is down")


def plain_params(n: int = 80, skipped=range(30, 70)) -> list[torch.Tensor]:
    """The run that never saw the data indices in ``skipped`` (what the rollback must give)."""
    model, opt = make_mlp()
    for t in range(n):
        i = t if t < skipped.start else t + len(skipped)
        g = torch.Generator().manual_seed(1000 + i)
        x = torch.randn(16, 8, generator=g)
        F.mse_loss(model(x), x.sum(1, keepdim=True).sin()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach() for p in model.parameters()]


# --- events --------------------------------------------------------------------------------
def test_event_sinks_get_every_event_and_a_failing_sink_is_switched_off_once(caplog):
    model, opt = make_mlp()
    good, broken = ListSink(), BrokenSink()
    assert isinstance(good, EventSink)
    with warnings.catch_warnings(record=True) as record, caplog.at_level("INFO", logger="seismo.guard"):
        warnings.simplefilter("always")
        guard = Guard(model, opt, sinks=[broken, good], ckpt_dir=None, interval=10, rewind=10, skip_ahead=25)
        run(guard, model)
        guard.close()
    received = [e for batch in good.batches for e in batch]
    kinds = [e.kind for e in received]
    assert kinds == ["guard_skip"] * 5 + ["guard_rollback"]
    assert received == guard.events
    assert [e.step for e in received[:5]] == [40, 41, 42, 43, 44]
    assert good.flushed == 1  # flushed at close (the user owns the sink: not closed)
    assert broken.calls == 1  # switched off after its first failure
    msgs = [str(w.message) for w in record if issubclass(w.category, GuardWarning)]
    assert sum("event sink BrokenSink failed" in m for m in msgs) == 1
    # the logger got the same events, at WARNING for skips and ERROR for the rollback
    logged = [(r.levelname, r.seismo_event.kind) for r in caplog.records if hasattr(r, "seismo_event")]
    assert logged == [("WARNING", "guard_skip")] * 5 + [("ERROR", "guard_rollback")]
    # and the run is the one that never saw the bad data: the sink failure changed nothing
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain_params()))


def test_sinks_must_be_event_sinks():
    model, opt = make_mlp()
    with pytest.raises(ConfigError, match=r"sinks\[0\]: expected an event sink with write_events\(events\), got "
                                          r"builtins.function"):
        Guard(model, opt, sinks=[lambda events: None])
    with pytest.raises(ConfigError, match=r"sinks: expected a list of event sinks, got ListSink"):
        Guard(model, opt, sinks=ListSink())


# --- wrapped models and optimizers -------------------------------------------------------
@pytest.mark.parametrize("thing", ["model", "scheduler", "list"])
def test_a_non_optimizer_is_one_config_error_naming_its_type(thing):
    model, opt = make_mlp()
    bad = {"model": model, "scheduler": torch.optim.lr_scheduler.StepLR(opt, 10), "list": [opt]}[thing]
    with pytest.raises(ConfigError) as info:
        Guard(model, bad)
    msg = str(info.value)
    assert msg.startswith("optimizer: expected a torch.optim.Optimizer") and "\n" not in msg
    assert type(bad).__qualname__ in msg


def test_a_non_module_model_is_one_config_error():
    _, opt = make_mlp()
    with pytest.raises(ConfigError, match=r"model: expected a torch.nn.Module, got builtins.dict"):
        Guard({}, opt)


def test_compiled_model_is_unwrapped_and_rolls_back_like_the_plain_one():
    model, opt = make_mlp()
    compiled = torch.compile(model, backend="eager")
    guard = Guard(compiled, opt, ckpt_dir=None, interval=10, rewind=10, skip_ahead=25)
    assert guard.model is model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GuardWarning)
        run(guard, compiled)
    assert not any(k.startswith("_orig_mod") for k in guard._ring[-1]["model"])
    assert guard.stats["rollbacks"] == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain_params()))


def test_accelerate_optimizer_is_unwrapped():
    accelerate = pytest.importorskip("accelerate")
    model, opt = make_mlp()
    acc = accelerate.Accelerator(cpu=True)
    model_w, opt_w = acc.prepare(model, opt)
    assert type(opt_w).__name__ == "AcceleratedOptimizer"
    guard = Guard(model_w, opt_w, policy="skip")
    assert guard.optimizer is opt
    run(guard, model_w, n=45, bad=range(30, 31))
    guard.flush()
    assert [(e.kind, e.step) for e in guard.events] == [("guard_skip", 30)]
    assert all(float(s["step"]) == 44 for s in opt.state_dict()["state"].values())  # one step skipped


def test_lightning_optimizer_is_unwrapped():
    lightning = pytest.importorskip("lightning")
    model, opt = make_mlp()
    wrapped = lightning.pytorch.core.optimizer.LightningOptimizer(opt)
    assert Guard(model, wrapped, policy="skip").optimizer is opt


def test_zero_redundancy_optimizer_skips_and_rolls_back(tmp_path):
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model, _ = make_mlp()
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
        guard = Guard(model, opt, ckpt_dir=tmp_path / "g", interval=10, disk_interval=10, rewind=10, skip_ahead=25)
        assert guard.optimizer is opt
        run(guard, model)
        guard.close()
        assert guard.stats["rollbacks"] == 1 and guard.skipped_ranges == [(30, 70)]
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain_params()))
    finally:
        dist.destroy_process_group()
