"""``MonitorConfig`` validation (each bad field is a one-line ConfigError naming it, from the config
and from the Monitor's old keyword arguments), the config's effect on the Monitor, the scalar-loss
check, and probes that fail to attach."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from seismo.errors import ConfigError
from seismo.monitor import MONITOR_PRESETS, PRESETS, GradientProbe, LossProbe, Monitor, MonitorConfig, every

BAD_FIELDS = [
    ("preset", "everything"),
    ("preset", None),
    ("every", 0),
    ("every", 2.5),
    ("every", True),
    ("flush_every", 0),
    ("flush_every", -1),
    ("flush_every", "50"),
    ("keep_history", "yes"),
    ("output", ""),
    ("output", 3),
    ("blocks", "transformer.h.0"),
    ("blocks", ["ok", 1]),
    ("attention_sample", 0),
    ("probe_loss", "not callable"),
    ("curvature_every", 0),
    ("curvature_every", None),
    ("start_step", -1),
    ("start_step", 1.0),
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS)
def test_each_bad_field_is_a_config_error_naming_it(field, value):
    with pytest.raises(ConfigError) as info:
        MonitorConfig(**{field: value})
    msg = str(info.value)
    assert msg.startswith(f"MonitorConfig.{field}: ") and "\n" not in msg
    assert repr(value) in msg or type(value).__name__ in msg
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(("field", "value"), [fv for fv in BAD_FIELDS if fv[0] != "preset"])
def test_old_keyword_arguments_are_validated_the_same_way(field, value):
    with pytest.raises(ConfigError, match=rf"^MonitorConfig\.{field}: "):
        Monitor(nn.Linear(2, 2), None, **{field: value})


def test_presets_keep_their_old_name_and_unknown_keywords_say_where_to_go():
    assert MONITOR_PRESETS == PRESETS == ("default", "full", "minimal")
    with pytest.raises(TypeError, match="seismo.Monitor"):
        Monitor(nn.Linear(2, 2), None, diagnose=True)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def test_config_sets_probes_schedule_flush_and_start_step_and_keywords_override_it():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = MonitorConfig(preset="minimal", every=2, flush_every=100, start_step=10)
    mon = Monitor(model, opt, cfg, flush_every=3)  # the keyword overrides the config's flush_every
    assert mon.config.flush_every == 3 and cfg.flush_every == 100  # the caller's config is not changed
    assert [p.name for p in mon.probes] == ["loss", "grad"]
    flushed_at = []
    for _ in range(7):
        x = torch.randn(3, 4)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(loss)
        flushed_at.append(len(mon.history.get("loss", ([], []))[0]))
    mon.close()
    assert mon.series("loss")[0] == [10, 12, 14, 16]  # every 2 steps from step 10
    # flushes after the 3rd and 6th calls: 2 then 3 tracked values on the host
    assert flushed_at == [0, 0, 2, 2, 2, 3, 3]


def test_a_dict_config_is_the_stored_run_config(tmp_path):
    from seismo.store import load_run

    mon = Monitor(_mlp(), None, {"lr": 0.5}, store=str(tmp_path / "r.sqlite"), run_name="d", probes="minimal")
    mon.close()
    assert load_run(tmp_path / "r.sqlite", "d").info.config == {"lr": 0.5}
    assert mon.config == MonitorConfig(preset="minimal")


@pytest.mark.parametrize("bad", [torch.ones(3), torch.ones(2, 2), torch.ones(0), "1.0", object()])
def test_step_refuses_anything_but_one_number(bad):
    model = _mlp()
    mon = Monitor(model, None, probes="minimal")
    with pytest.raises(ConfigError) as info:
        mon.step(bad)
    msg = str(info.value)
    assert msg.startswith("loss: Monitor.step needs a scalar loss") and "\n" not in msg
    if isinstance(bad, torch.Tensor):
        assert str(tuple(bad.shape)) in msg
    assert mon.step_count == 0  # nothing was recorded
    mon.close()


@pytest.mark.parametrize("good", [torch.tensor(1.5), torch.tensor([1.5]), 1.5, 2])
def test_step_accepts_a_scalar_tensor_or_a_number(good):
    mon = Monitor(_mlp(), None, probes=[LossProbe()], flush_every=1)
    mon.step(good)
    mon.close()
    assert mon.series("loss") == ([0], [float(good if not isinstance(good, torch.Tensor) else good.reshape(()))])


class AttachRaises:
    def __init__(self, exc: Exception):
        self.name = "custom"
        self.schedule = every(1)
        self.exc = exc

    def attach(self, ctx):
        raise self.exc

    def arm(self, step):
        raise AssertionError("never armed")

    def collect(self, step, loss):
        raise AssertionError("never collected")

    def detach(self):
        raise AssertionError("a probe that failed to attach is not detached")


@pytest.mark.parametrize("exc", [KeyError("weight"), AttributeError("no _optimizer_step_pre_hooks"), RuntimeError("boom")])
def test_a_probe_raising_in_attach_is_disabled_with_one_warning(exc):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = Monitor(model, opt, probes=[LossProbe(), AttachRaises(exc), GradientProbe()], flush_every=1)
        x, y = torch.randn(3, 4), torch.tensor([0, 1, 0])
        for _ in range(2):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss)
        mon.close()
    mine = [str(w.message) for w in caught if "'custom'" in str(w.message)]
    assert len(mine) == 1 and type(exc).__name__ in mine[0]
    assert list(mon.disabled) == ["custom"] and [p.name for p in mon.probes] == ["loss", "grad"]
    assert mon.series("grad/norm")[0] == [0, 1]
