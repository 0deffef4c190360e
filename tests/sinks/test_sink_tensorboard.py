"""seismo.sinks.TensorBoard, read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import math
import re

import pytest
from conftest import NAN_STEP, sample_events

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import SCALARS, TENSORS, EventAccumulator  # noqa: E402

from seismo.errors import ConfigError  # noqa: E402
from seismo.sinks import TensorBoard  # noqa: E402


def read_back(log_dir) -> tuple[dict[str, dict[int, float]], list[tuple[int, str]]]:
    """({tag: {step: value}}, [(step, text)] of seismo/events) as TensorBoard loads them."""
    acc = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0, TENSORS: 0})  # 0: keep everything
    acc.Reload()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    texts = []
    if "seismo/events" in acc.Tags()["tensors"]:
        texts = [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors("seismo/events")]
    return scalars, texts


def same(a: float, b: float) -> bool:
    """Equal as TensorBoard stores them (float32), NaN equal to NaN."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == pytest.approx(b, rel=1e-6, abs=1e-30) or (math.isinf(a) and a == b)


def test_every_metric_and_event_of_the_store_reads_back(tmp_path, monitored_run):
    log_dir = tmp_path / "tb"
    stored = monitored_run([TensorBoard(log_dir)])
    scalars, texts = read_back(log_dir)
    assert set(scalars) == set(stored.series)
    assert "attn/logit_max/transformer.h.0.attn" in scalars  # a dotted module name survives
    for name, by_step in stored.series.items():
        assert set(scalars[name]) == set(by_step), name
        bad = [s for s, v in by_step.items() if not same(scalars[name][s], v)]
        assert not bad, (name, bad[:3])
    assert math.isnan(scalars["loss"][NAN_STEP])  # the non-finite loss is stored as NaN
    assert len(texts) == len(stored.events) >= 2
    for ev in stored.events:
        (text,) = [t for step, t in texts if step == ev["step"] and f"**{ev['severity']}** `{ev['kind']}` at step {ev['step']}" in t]
        plain = re.sub(r"\\([\\`*_\[\]<>|~])", r"\1", text)  # undo the Markdown escapes
        assert ev["message"] in plain
        assert (f"*advice:* {ev['advice']}" in plain) == bool(ev["advice"])


def test_events_as_markdown_with_every_field(tmp_path):
    sink = TensorBoard(tmp_path)
    events = sample_events()
    sink.write_events(events)
    sink.close()
    _, texts = read_back(tmp_path)
    assert [s for s, _ in texts] == [3, 3, 7]  # two events at one step are both kept
    first, second, third = (t for _, t in texts)
    assert "**warning** `loss_spike` at step 3" in first and "lower the learning rate" in first
    assert "`transformer.h.0.attn`" in second and "**critical**" in second
    assert "\\<b\\>1e4\\</b\\>" in second  # the message's markup is escaped, not rendered
    assert "(arXiv:2309.14322)" in second and '"value": Infinity' in second
    assert "loss is nan" in third and "advice" not in third


def test_prefix_non_finite_and_one_summary_per_step(tmp_path, monkeypatch):
    sink = TensorBoard(tmp_path, prefix="seismo/")
    calls = []
    add = sink._writer.add_summary
    monkeypatch.setattr(sink._writer, "add_summary", lambda *a, **k: (calls.append(a[1]), add(*a, **k)))
    sink.write_records([(0, {"grad/norm": 1.5, "loss": math.inf, "big": 1e300}),
                        (1, {"grad/norm": math.nan, "loss": -math.inf, "x": "n/a"})])
    assert calls == [0, 1]  # one Summary per step, all its scalars in it
    sink.close()
    scalars, _ = read_back(tmp_path)
    assert set(scalars) == {"seismo/grad/norm", "seismo/loss", "seismo/big"}  # a value that is not a number is skipped
    assert scalars["seismo/big"] == {0: math.inf}  # beyond float32
    assert scalars["seismo/grad/norm"][0] == 1.5 and math.isnan(scalars["seismo/grad/norm"][1])
    assert scalars["seismo/loss"] == {0: math.inf, 1: -math.inf}


def test_flush_writes_to_disk_without_closing(tmp_path):
    sink = TensorBoard(tmp_path, flush_secs=3600)
    sink.write_records([(5, {"loss": 2.0})])
    sink.flush()
    assert read_back(tmp_path)[0] == {"loss": {5: 2.0}}
    sink.close()
    sink.close()  # idempotent
    sink.write_records([(6, {"loss": 1.0})])  # after close: ignored, never raises


def test_a_failing_writer_turns_the_sink_off_with_one_warning(tmp_path, monkeypatch):
    sink = TensorBoard(tmp_path)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(sink._writer, "add_summary", broken)
    with pytest.warns(RuntimeWarning, match="TensorBoard is off after a failed write_records: OSError: disk full"):
        sink.write_records([(0, {"loss": 1.0})])
    assert sink.disabled is not None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sink.write_records([(1, {"loss": 1.0})])
        sink.write_events(sample_events())
        sink.flush()
        sink.close()


@pytest.mark.parametrize("kwargs, field", [({"log_dir": ""}, "log_dir"), ({"log_dir": None}, "log_dir"),
                                           ({"log_dir": "x", "prefix": 3}, "prefix"), ({"log_dir": "x", "flush_secs": 0}, "flush_secs")])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        TensorBoard(**kwargs)


def test_missing_tensorboard_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "tensorboard.compat.proto.summary_pb2", None)
    with pytest.raises(ImportError, match=r"pip install 'seismo\[tb\]'"):
        TensorBoard(tmp_path)
