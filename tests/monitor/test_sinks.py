"""The Monitor's sink fan-out: records reach every record sink once, in order, one call per flush;
events returned by a record sink (or passed to ``emit``) reach every event sink; a raising sink is
removed with one warning while training goes on; the run store is a sink (``StoreSink``).

References are what the test's own loop computed (its losses, its gradient norms), never the
Monitor's history.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from seismo.errors import ConfigError
from seismo.events import Event, EventSink, RecordSink
from seismo.monitor import Monitor
from seismo.store import load_run
from seismo.store.sink import StoreSink

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 10


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + step)
    return torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g)


def train(model, opt, mon, steps=STEPS, spike_at=()):
    """The loop; returns the losses and global gradient norms it saw itself (float32 host values)."""
    losses, norms = [], []
    for step in range(steps):
        x, y = batch(step)
        loss = F.cross_entropy(model(x), y) * (50.0 if step in spike_at else 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norms.append(math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters())))
        opt.step()
        mon.step(loss)
        losses.append(float(loss.detach()))
    return losses, norms


class Recorder:
    """A record and event sink that keeps every call."""

    def __init__(self, name="recorder"):
        self.name = name
        self.record_calls: list[list] = []
        self.event_calls: list[list[Event]] = []
        self.flushed = 0
        self.closed = 0

    def write_records(self, records):
        self.record_calls.append([(step, dict(values)) for step, values in records])

    def write_events(self, events):
        self.event_calls.append(list(events))

    def flush(self):
        self.flushed += 1

    def close(self):
        self.closed += 1


class LossAbove:
    """A record sink (a toy detector) that returns one event per record whose loss exceeds ``limit``."""

    def __init__(self, limit: float):
        self.limit = limit

    def write_records(self, records):
        return [Event("loss_spike", "warning", step, message=f"loss {v['loss']:.3g}")
                for step, v in records if v.get("loss", 0.0) > self.limit]


class EventsOnly:
    def __init__(self):
        self.events: list[Event] = []

    def write_events(self, events):
        self.events.extend(events)


class Raising:
    name = "raising"

    def __init__(self):
        self.calls = 0

    def write_records(self, records):
        self.calls += 1
        raise OSError("disk full")


def test_sink_protocols_are_what_the_fixtures_implement():
    assert isinstance(Recorder(), RecordSink) and isinstance(Recorder(), EventSink)
    assert isinstance(LossAbove(1.0), RecordSink) and not isinstance(LossAbove(1.0), EventSink)


def test_a_record_sink_gets_every_flushed_value_once_in_order_one_call_per_flush():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder()
    mon = Monitor(model, opt, probes="minimal", flush_every=3, sinks=[rec])
    losses, norms = train(model, opt, mon)
    mon.log({"val/loss": 2.5}, step=STEPS - 1)
    mon.close()
    # flushes after steps 2, 5, 8 (every 3 steps) and at close (step 9 + the logged value)
    assert [[s for s, _ in call] for call in rec.record_calls] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 9]]
    flat = [r for call in rec.record_calls for r in call]
    assert [v["loss"] for s, v in flat if "loss" in v] == losses  # float32 losses, bitwise
    got_norms = [v["grad/norm"] for s, v in flat if "grad/norm" in v]
    assert got_norms == pytest.approx(norms, rel=1e-5)
    assert flat[-1] == (9, {"val/loss": 2.5})
    assert rec.flushed == 1 and rec.closed == 1
    mon.close()  # idempotent: the sinks are not closed twice
    assert rec.closed == 1


def test_events_returned_by_a_record_sink_reach_every_event_sink_and_the_store(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec, only = Recorder(), EventsOnly()
    path = tmp_path / "runs.sqlite"
    mon = Monitor(model, opt, probes="minimal", flush_every=4, store=str(path), run_name="ev", sinks=[LossAbove(20.0), rec, only])
    losses, _ = train(model, opt, mon, spike_at=(3, 7))
    mon.close()
    expected = [s for s, v in enumerate(losses) if v > 20.0]
    assert expected == [3, 7]  # the loop's own losses: the spikes are there
    assert [e.step for e in mon.events] == expected
    assert [e.step for e in only.events] == expected
    assert [[e.step for e in call] for call in rec.event_calls] == [[3], [7]]  # one call per flush with events
    stored = load_run(path, mon.run_id).events
    assert [(e["step"], e["kind"]) for e in stored] == [(3, "loss_spike"), (7, "loss_spike")]


def test_emit_reaches_event_sinks_only_and_add_sink_joins_later():
    model = mlp()
    rec, records_only, late = Recorder(), LossAbove(1e9), Recorder("late")
    mon = Monitor(model, None, probes="minimal", sinks=[records_only, rec])
    ev = Event("stall", "info", 4, module="0", message="hand-made")
    mon.emit([ev])
    mon.add_sink(late)
    ev2 = Event("nonfinite", "critical", 5, message="nan")
    mon.write_events([ev2])  # the Monitor is itself an event sink
    assert mon.events == [ev, ev2] and rec.event_calls == [[ev], [ev2]] and rec.record_calls == []
    assert late.event_calls == [[ev2]]
    mon.close()
    assert late.closed == 1


def test_a_raising_sink_is_removed_with_one_warning_and_training_goes_on():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bad, rec = Raising(), Recorder()
    mon = Monitor(model, opt, probes="minimal", flush_every=2, sinks=[bad, rec])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses, _ = train(model, opt, mon)
        mon.close()
    mine = [str(w.message) for w in caught if "raising" in str(w.message)]
    assert len(mine) == 1 and "disk full" in mine[0] and "OSError" in mine[0]
    assert bad.calls == 1 and bad not in mon.sinks and rec in mon.sinks
    assert [v["loss"] for call in rec.record_calls for _, v in call] == losses


def test_listeners_still_get_every_record():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    mon = Monitor(model, opt, probes="minimal", flush_every=4, listeners=[lambda s, v: seen.append((s, v["loss"]))])
    losses, _ = train(model, opt, mon)
    mon.close()
    assert seen == list(enumerate(losses))


def test_an_object_that_is_no_sink_is_refused():
    with pytest.raises(ConfigError, match=r"^sinks: object has neither write_records"):
        Monitor(mlp(), None, sinks=[object()])


def test_store_sink_alone_round_trips_records_events_and_status(tmp_path):
    path = tmp_path / "s.sqlite"
    sink = StoreSink(path, "alone", config={"lr": 0.1}, meta={"who": "test"})
    sink.write_records([(0, {"loss": 1.5, "grad/norm": 2.0}), (1, {"loss": 1.25})])
    sink.write_events([Event("nonfinite", "critical", 1, message="nan")])
    sink.set_status("diverged", meta={"steps_done": 2})
    sink.close()
    sink.close()
    run = load_run(path, sink.run_id)
    assert run.info.name == "alone" and run.info.status == "diverged" and run.info.config == {"lr": 0.1}
    assert run.info.meta["who"] == "test" and run.info.meta["steps_done"] == 2
    assert run.series("loss")[0].tolist() == [0, 1] and run.series("loss")[1].tolist() == [1.5, 1.25]
    assert [(e["kind"], e["step"]) for e in run.events] == [("nonfinite", 1)]
    # resuming continues the same run
    again = StoreSink(path, run_id=sink.run_id)
    assert again.run_id == sink.run_id and load_run(path, sink.run_id).info.status == "running"
    again.set_status("completed")
    again.close()


def test_store_shorthand_and_explicit_store_sink_are_the_same(tmp_path):
    path = tmp_path / "runs.sqlite"
    for how in ("shorthand", "sink"):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        kw = dict(store=str(path), run_name=how) if how == "shorthand" else dict(sinks=[StoreSink(path, how)])
        mon = Monitor(model, opt, probes="minimal", flush_every=3, **kw)
        losses, _ = train(model, opt, mon)
        mon.close()
        run = load_run(path, how)
        assert run.info.run_id == mon.run_id and run.info.status == "completed"
        assert run.series("loss")[1].tolist() == pytest.approx(losses, rel=0, abs=0)
