"""``seismo.integrations.lightning.SeismoCallback`` inside a real Lightning 2.x Trainer.

The model is the tiny random Llama of issue 11 wrapped in a LightningModule that keeps its own
micro-batch losses: the reference for the loss seismo records for each optimizer step. Loggers
are read back from their own files (CSV, TensorBoard event files).
"""

from __future__ import annotations

import csv
import math
import warnings

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from seismo.errors import ConfigError  # noqa: E402
from seismo.events import Event  # noqa: E402
from seismo.integrations.lightning import SeismoCallback  # noqa: E402
from seismo.store import load_run  # noqa: E402

ATTN = [f"model.model.layers.{i}.self_attn" for i in range(2)]


class LlamaModule(pl.LightningModule):
    """The Llama as a LightningModule. ``manual``: the user steps the optimizer every ``accumulate``
    batches, backpropagating ``loss / accumulate``. ``inf_at``: the loss of that optimizer step is
    multiplied by inf (a non-finite step for the Guard)."""

    def __init__(self, model, manual: bool = False, accumulate: int = 1, inf_at: int | None = None):
        super().__init__()
        self.model = model
        self.automatic_optimization = not manual
        self.accumulate = accumulate
        self.inf_at = inf_at
        self.losses: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch, labels=batch).loss
        if self.inf_at is not None and self.trainer.global_step == self.inf_at:
            loss = loss * float("inf")
        self.losses.append(loss.detach().clone())
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        self.manual_backward(loss / self.accumulate)
        if (batch_idx + 1) % self.accumulate == 0:
            opt.step()
            opt.zero_grad()
        return None

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-2, weight_decay=0.0)


def _fit(module, steps: int, batches, callbacks, accumulate: int = 1, **kw) -> pl.Trainer:
    base = dict(max_steps=steps, accumulate_grad_batches=accumulate, callbacks=callbacks, logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                gradient_clip_val=1.0 if module.automatic_optimization else None, log_every_n_steps=10)
    base.update(kw)
    trainer = pl.Trainer(**base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=8))
    return trainer


def _step_means(losses: list[torch.Tensor], accumulate: int) -> list[float]:
    """The reference: per optimizer step, the sum of the micro-batch losses divided by ``accumulate``."""
    out = []
    for j in range(len(losses) // accumulate):
        total = torch.zeros(())
        for x in losses[j * accumulate:(j + 1) * accumulate]:
            total = total + x / accumulate
        out.append(float(total))
    return out


def test_lightning_done_when_llama_sdpa_gqa(tmp_path, llama, token_data):
    """Issue 11's done-when with Lightning: attn/logit_max for every layer, the module's own loss at
    every step, an attention_logit_growth event; metrics through a Lightning logger (CSV, read back)."""
    steps = 200
    store = tmp_path / "seismo.sqlite"
    module = LlamaModule(llama(0))
    cb = SeismoCallback(store=store, run_name="pl", alerts=False)
    logger = pl.loggers.CSVLogger(tmp_path / "csv", name="llama")
    _fit(module, steps, token_data(8 * steps), [cb], logger=logger)

    m = cb.monitor
    for name in ATTN:
        s, _ = m.series(f"attn/logit_max/{name}")
        assert s == list(range(steps))  # numbered as Lightning's loggers number steps
    s, v = m.series("loss")
    assert v == _step_means(module.losses, 1)
    growth = [e for e in m.events if e.kind == "attention_logit_growth"]
    assert growth and {e.module for e in growth} <= set(ATTN)

    run = load_run(store, "pl")
    assert run.info.status == "completed" and run.info.meta["framework"] == "lightning"
    assert any(e["kind"] == "attention_logit_growth" for e in run.events)
    with open(logger.experiment.metrics_file_path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("seismo/loss")]
    assert [int(r["step"]) for r in rows] == list(range(9, steps, 10))
    ours = dict(zip(s, v))
    assert all(float(r["seismo/loss"]) == pytest.approx(ours[int(r["step"])], rel=1e-6) for r in rows)
    assert all(r[f"seismo/attn/logit_max/{ATTN[0]}"] for r in rows)
    logged_growth = sum(float(r.get("seismo/events/attention_logit_growth") or 0) for r in rows)
    assert logged_growth == len(growth)  # the last logging step (199) is the last step: every event was logged


def test_lightning_automatic_accumulation(tmp_path, llama, token_data):
    steps = 30
    module = LlamaModule(llama(1))
    cb = SeismoCallback(alerts=False)
    _fit(module, steps, token_data(16 * steps), [cb], accumulate=2)
    s, v = cb.monitor.series("loss")
    assert s == list(range(steps)) and len(module.losses) == 2 * steps
    assert v == _step_means(module.losses, 2)  # the mean of the two micro-batches, each step


def test_lightning_manual_optimization_with_accumulation(tmp_path, llama, token_data):
    steps = 30
    module = LlamaModule(llama(2), manual=True, accumulate=2)
    cb = SeismoCallback(alerts=False)
    _fit(module, steps, token_data(16 * steps), [cb])
    s, v = cb.monitor.series("loss")
    assert s == list(range(steps)) and len(module.losses) == 2 * steps
    assert v == _step_means(module.losses, 2)
    assert any(k.startswith("adam/") for k in cb.monitor.history)  # the optimizer was found behind LightningOptimizer


class _InjectEvent:
    def __init__(self) -> None:
        self.sent = False

    def write_records(self, records):
        if self.sent:
            return None
        self.sent = True
        return [Event("loss_spike", "warning", records[-1][0], "model.model.layers.1", "injected <event>", {}, "lower the LR")]


def test_lightning_tensorboard_logger_reads_back_scalars_and_event_text(tmp_path, llama, token_data):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = 12
    logger = pl.loggers.TensorBoardLogger(tmp_path / "tb", name="llama")
    cb = SeismoCallback(alerts=False, sinks=[_InjectEvent()], flush_every=4)
    _fit(LlamaModule(llama(3)), steps, token_data(8 * steps), [cb], logger=logger, log_every_n_steps=4)
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    loss = {e.step: e.value for e in acc.Scalars("seismo/loss")}
    s, v = cb.monitor.series("loss")
    ours = dict(zip(s, v))
    assert sorted(loss) == [3, 7, 11] and all(loss[k] == pytest.approx(ours[k], rel=1e-6) for k in loss)
    assert "seismo/events/loss_spike" in acc.Tags()["scalars"]
    text = acc.Tensors("seismo/events/text_summary")
    assert [t.step for t in text] == [3]
    assert "loss_spike [model.model.layers.1]: injected <event>" in text[0].tensor_proto.string_val[0].decode()


class _PoisonAt(pl.Callback):
    def __init__(self, at: int):
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            with torch.no_grad():
                pl_module.model.lm_head.weight.fill_(float("inf"))


def test_lightning_stop_on_nonfinite(tmp_path, llama, token_data):
    steps = 60
    store = tmp_path / "s.sqlite"
    cb = SeismoCallback(store=store, run_name="nan", alerts=False, stop_on="nonfinite", flush_every=1)
    trainer = _fit(LlamaModule(llama(4)), steps, token_data(8 * steps), [_PoisonAt(5), cb])
    assert trainer.global_step == 6  # step 5 (0-based) is the first NaN one; training stops after it
    s, v = cb.monitor.series("loss")
    assert math.isnan(v[5]) and all(math.isfinite(x) for x in v[:5])
    run = load_run(store, "nan")
    assert run.info.status == "stopped" and "nonfinite" in run.info.meta["stopped_by"]


class _Snapshots(pl.Callback):
    def __init__(self):
        self.before: dict[int, list[torch.Tensor]] = {}
        self.after: dict[int, list[torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.setdefault(trainer.global_step, [p.detach().clone() for p in pl_module.parameters()])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = [p.detach().clone() for p in pl_module.parameters()]


@pytest.mark.parametrize("manual", [False, True])
def test_lightning_guard_skip_leaves_a_nonfinite_step_out(tmp_path, llama, token_data, manual):
    steps, bad = 14, 7
    module = LlamaModule(llama(5), manual=manual, inf_at=bad)
    snaps = _Snapshots()
    store = tmp_path / "g.sqlite"
    cb = SeismoCallback(store=store, run_name="guarded", alerts=False, guard="skip")
    trainer = _fit(module, steps, token_data(8 * steps), [snaps, cb])
    assert trainer.global_step == steps
    assert all(torch.equal(a, b) for a, b in zip(snaps.before[bad], snaps.after[bad]))  # the bad step changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(snaps.before[bad + 1], snaps.after[bad + 1]))
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert cb.guard.stats["skipped_steps"] == 1
    assert [e["step"] for e in load_run(store, "guarded").events if e["kind"] == "guard_skip"] == [bad]
    assert "step" not in trainer.optimizers[0].__dict__  # the optimizer's own step is back


def test_lightning_without_guard_the_same_step_ruins_the_weights(tmp_path, llama, token_data):
    module = LlamaModule(llama(5), inf_at=7)
    _fit(module, 9, token_data(8 * 9), [SeismoCallback(alerts=False)], gradient_clip_val=None)
    assert not all(torch.isfinite(p).all() for p in module.parameters())


def test_lightning_callback_failure_does_not_stop_training(tmp_path, llama, token_data, monkeypatch):
    from seismo.integrations._attached import AttachedMonitor

    def broken(self, loss):
        raise RuntimeError("boom")

    monkeypatch.setattr(AttachedMonitor, "add_loss", broken)
    steps = 4
    cb = SeismoCallback(alerts=False)
    trainer = pl.Trainer(max_steps=steps, callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    with pytest.warns(RuntimeWarning, match="SeismoCallback is off: reading the loss raised RuntimeError: boom") as rec:
        trainer.fit(LlamaModule(llama(6)), torch.utils.data.DataLoader(token_data(8 * steps), batch_size=8))
    assert trainer.global_step == steps
    assert sum("SeismoCallback is off" in str(w.message) for w in rec) == 1


def test_lightning_callback_bad_options_fail_at_construction():
    with pytest.raises(ConfigError, match="stop_on: unknown event kind"):
        SeismoCallback(stop_on=["nonfinite", "oops"])
    with pytest.raises(ConfigError, match="guard_config.policy: must be 'skip'"):
        from seismo import GuardConfig

        SeismoCallback(guard_config=GuardConfig(policy="rollback"))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_lightning_attention_growth_over_seeds(tmp_path, llama, token_data, seed, accumulate):
    steps = 200
    module = LlamaModule(llama(seed))
    cb = SeismoCallback(alerts=False)
    _fit(module, steps, token_data(8 * accumulate * steps), [cb], accumulate=accumulate)
    assert cb.monitor.series("loss")[1] == _step_means(module.losses, accumulate)
    assert any(e.kind == "attention_logit_growth" for e in cb.monitor.events)
