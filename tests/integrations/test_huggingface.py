"""``seismo.integrations.huggingface.SeismoCallback`` inside a real ``transformers.Trainer``.

References are the Trainer's own outputs (``trainer.state.log_history``, TensorBoard event files
written by its ``report_to`` backend), never the callback's.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from seismo.errors import ConfigError  # noqa: E402
from seismo.events import Event  # noqa: E402
from seismo.integrations.huggingface import SeismoCallback  # noqa: E402
from seismo.store import load_run  # noqa: E402

ATTN = [f"model.layers.{i}.self_attn" for i in range(2)]


def _args(tmp_path, steps: int, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, learning_rate=3e-2, max_steps=steps,
                logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0,
                lr_scheduler_type="constant", warmup_steps=0)
    base.update(kw)
    return TrainingArguments(**base)


def _train(model, args, dataset, callbacks, trainer_cls=Trainer) -> Trainer:
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer


def _logged(trainer: Trainer, key: str) -> dict[int, float]:
    return {h["step"]: h[key] for h in trainer.state.log_history if key in h}


class _InjectEvent:
    """A record sink returning one event at its first flush (a deterministic event for the log path)."""

    def __init__(self) -> None:
        self.sent = False

    def write_records(self, records):
        if self.sent:
            return None
        self.sent = True
        step = records[-1][0]
        return [Event("loss_spike", "warning", step, "model.layers.1", "injected <event>", {"z": 9.0}, "lower the LR")]


def test_trainer_done_when_llama_sdpa_gqa(tmp_path, llama, token_dataset):
    """Issue 11's done-when: no hand unwrapping; attn/logit_max for every layer; the loss of every
    logged step equals the Trainer's logged loss; an attention_logit_growth event; the same in the store."""
    steps = 200
    store = tmp_path / "seismo.sqlite"
    cb = SeismoCallback(store=store, run_name="exp1", alerts=False)
    trainer = _train(llama(0), _args(tmp_path, steps), token_dataset(8 * steps), [cb])

    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"  # what the callback got, unwrapped by seismo
    m = cb.monitor
    for name in ATTN:
        s, v = m.series(f"attn/logit_max/{name}")
        assert s == list(range(1, steps + 1)) and all(math.isfinite(x) for x in v)

    logged = _logged(trainer, "loss")
    assert sorted(logged) == list(range(1, steps + 1))
    s, v = m.series("loss")
    ours = dict(zip(s, v))
    assert all(ours[k] == logged[k] for k in logged), [(k, ours[k], logged[k]) for k in logged if ours[k] != logged[k]][:3]

    growth = [e for e in m.events if e.kind == "attention_logit_growth"]
    assert growth and {e.module for e in growth} <= set(ATTN)

    run = load_run(store, "exp1")
    assert run.info.status == "completed" and run.info.meta["framework"] == "transformers"
    assert any(e["kind"] == "attention_logit_growth" for e in run.events)
    st, sv = run.series("loss")
    assert [int(x) for x in st] == sorted(logged) and all(float(x) == logged[int(k)] for k, x in zip(st, sv))
    # seismo's scalars went through Trainer.log, prefixed, at each logging step
    sent = _logged(trainer, f"seismo/attn/logit_max/{ATTN[1]}")
    rs, rv = run.series(f"attn/logit_max/{ATTN[1]}")
    assert sorted(sent) == list(range(1, steps + 1)) and all(sent[int(k)] == float(x) for k, x in zip(rs, rv))
    counts = _logged(trainer, "seismo/events/attention_logit_growth")
    assert sum(counts.values()) == len(growth)


def test_trainer_gradient_accumulation_loss_is_the_logged_loss(tmp_path, llama, token_dataset):
    """With gradient_accumulation_steps=2: one record per optimizer step, its loss the Trainer's logged loss."""
    steps = 40
    cb = SeismoCallback(alerts=False)
    trainer = _train(llama(1), _args(tmp_path, steps, gradient_accumulation_steps=2, train_sampling_strategy="sequential"),
                     token_dataset(16 * steps), [cb])
    logged = _logged(trainer, "loss")
    s, v = cb.monitor.series("loss")
    assert s == list(range(1, steps + 1)) == sorted(logged)
    assert all(ours == logged[k] for k, ours in zip(s, v))
    # and it is the mean over the two micro-batches, not one of them: an independent recomputation of step 1
    model = llama(1)
    batch = token_dataset(16 * steps).tokens[:16]
    with torch.no_grad():
        halves = [model(input_ids=b, labels=b).loss for b in (batch[:8], batch[8:])]
    assert v[0] == pytest.approx(float(sum(halves)) / 2, rel=1e-5)


def test_trainer_logging_steps_mean_and_cadence(tmp_path, llama, token_dataset):
    """logging_steps=5: seismo logs at steps 5, 10, ...; the Trainer's logged loss is the mean of seismo's five."""
    steps = 20
    cb = SeismoCallback(alerts=False, log_signals=["loss", "attn/"])
    trainer = _train(llama(2), _args(tmp_path, steps, logging_steps=5), token_dataset(8 * steps), [cb])
    s, v = cb.monitor.series("loss")
    ours = dict(zip(s, v))
    logged = _logged(trainer, "loss")
    assert sorted(logged) == [5, 10, 15, 20]
    for k, loss in logged.items():
        assert loss == pytest.approx(sum(ours[j] for j in range(k - 4, k + 1)) / 5, rel=1e-6)
    sent = [h for h in trainer.state.log_history if any(key.startswith("seismo/") for key in h)]
    assert [h["step"] for h in sent] == [5, 10, 15, 20]
    assert all(key.startswith(("seismo/loss", "seismo/attn/", "seismo/events")) for h in sent for key in h if key.startswith("seismo/"))
    assert sent[-1]["seismo/loss"] == ours[20]


def test_trainer_logging_strategy_epoch(tmp_path, llama, token_dataset):
    """logging_strategy="epoch": seismo's values come with the Trainer's epoch logs (5 steps per epoch)."""
    cb = SeismoCallback(alerts=False, log_signals="loss")
    trainer = _train(llama(2), _args(tmp_path, -1, num_train_epochs=2, logging_strategy="epoch"), token_dataset(40), [cb])
    assert sorted(_logged(trainer, "loss")) == [5, 10]
    sent = _logged(trainer, "seismo/loss")
    s, v = cb.monitor.series("loss")
    assert sent == {5: v[s.index(5)], 10: v[s.index(10)]}


def test_trainer_tensorboard_reads_back_seismo_scalars_and_events(tmp_path, llama, token_dataset):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = 12
    cb = SeismoCallback(alerts=False, sinks=[_InjectEvent()], flush_every=4)
    _train(llama(3), _args(tmp_path, steps, report_to=["tensorboard"], logging_steps=4), token_dataset(8 * steps), [cb])
    files = list((tmp_path / "out").rglob("events.out.tfevents.*"))  # the Trainer's default logging dir
    assert len(files) == 1
    acc = EventAccumulator(str(files[0].parent), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    # the Trainer's TensorBoard callback writes train/<key>
    loss = {e.step: e.value for e in acc.Scalars("train/seismo/loss")}
    s, v = cb.monitor.series("loss")
    ours = dict(zip(s, v))
    assert sorted(loss) == [4, 8, 12] and all(loss[k] == pytest.approx(ours[k], rel=1e-6) for k in loss)
    assert f"train/seismo/attn/logit_max/{ATTN[0]}" in tags["scalars"]
    assert "train/seismo/events/loss_spike" in tags["scalars"]
    text = acc.Tensors("train/seismo/events/text_summary")  # add_text's tag
    assert len(text) == 1 and text[0].step == 4
    line = text[0].tensor_proto.string_val[0].decode()
    assert "loss_spike [model.layers.1]: injected <event>" in line and "Advice: lower the LR" in line


class _PoisonAt(TrainerCallback):
    """Sets the output weights to inf after optimizer step ``at``: every later loss is NaN."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at:
            with torch.no_grad():
                model.lm_head.weight.fill_(float("inf"))
        return control


def test_trainer_stop_on_nonfinite(tmp_path, llama, token_dataset):
    steps = 60
    store = tmp_path / "s.sqlite"
    cb = SeismoCallback(store=store, run_name="nan", alerts=False, stop_on="nonfinite", flush_every=1)
    trainer = _train(llama(4), _args(tmp_path, steps), token_dataset(8 * steps), [_PoisonAt(5), cb])
    # the loss of step 6 is NaN; the nonfinite detector sees it at that step's flush: training stops there
    assert trainer.state.global_step == 6
    s, v = cb.monitor.series("loss")
    assert math.isnan(v[s.index(6)]) and all(math.isfinite(x) for x in v[:5])
    logged = _logged(trainer, "loss")
    assert math.isfinite(logged[6])  # the Trainer's nan filter hides it; seismo records what happened
    run = load_run(store, "nan")
    assert run.info.status == "stopped" and "nonfinite" in run.info.meta["stopped_by"]


def test_trainer_without_stop_on_runs_to_the_end(tmp_path, llama, token_dataset):
    steps = 10
    cb = SeismoCallback(alerts=False, flush_every=1)
    trainer = _train(llama(4), _args(tmp_path, steps), token_dataset(8 * steps), [_PoisonAt(5), cb])
    assert trainer.state.global_step == steps
    assert any(e.kind == "nonfinite" for e in cb.monitor.events)


class _InfLossTrainer(Trainer):
    """A Trainer whose loss is multiplied by inf on the micro-batches of optimizer step ``bad`` (1-based)."""

    bad = 8

    def compute_loss(self, model, inputs, **kw):
        loss = super().compute_loss(model, inputs, **kw)
        return loss * float("inf") if self.state.global_step + 1 == self.bad else loss


class _Snapshots(TrainerCallback):
    def __init__(self):
        self.before: dict[int, list[torch.Tensor]] = {}
        self.after: dict[int, list[torch.Tensor]] = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.before[state.global_step + 1] = [p.detach().clone() for p in model.parameters()]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after[state.global_step] = [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_guard_skip_leaves_a_nonfinite_step_out(tmp_path, llama, token_dataset, accumulation):
    steps, bad = 14, _InfLossTrainer.bad
    snaps = _Snapshots()
    store = tmp_path / "g.sqlite"
    cb = SeismoCallback(store=store, run_name="guarded", alerts=False, guard="skip")
    trainer = _train(llama(5), _args(tmp_path, steps, gradient_accumulation_steps=accumulation),
                     token_dataset(8 * accumulation * steps), [snaps, cb], trainer_cls=_InfLossTrainer)
    assert trainer.state.global_step == steps
    assert all(torch.equal(a, b) for a, b in zip(snaps.before[bad], snaps.after[bad]))  # the bad step changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(snaps.before[bad + 1], snaps.after[bad + 1]))  # training goes on
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert cb.guard.stats["skipped_steps"] == 1
    skips = [e for e in load_run(store, "guarded").events if e["kind"] == "guard_skip"]
    assert [e["step"] for e in skips] == [bad]  # numbered as the Trainer numbers steps
    assert trainer.optimizer.optimizer.__dict__.get("step") is None  # the optimizer's own step is back


def test_trainer_without_guard_the_same_step_ruins_the_weights(tmp_path, llama, token_dataset):
    """The control for the Guard test: the inf loss does reach the weights without the Guard."""
    steps = _InfLossTrainer.bad
    trainer = _train(llama(5), _args(tmp_path, steps, max_grad_norm=0.0), token_dataset(8 * steps), [SeismoCallback(alerts=False)],
                     trainer_cls=_InfLossTrainer)
    assert not all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_trainer_callback_failure_does_not_stop_training(tmp_path, llama, token_dataset, monkeypatch):
    from seismo.integrations._attached import AttachedMonitor

    def broken(self):
        raise RuntimeError("boom")

    monkeypatch.setattr(AttachedMonitor, "end_step", broken)
    steps = 5
    cb = SeismoCallback(alerts=False)
    trainer = Trainer(model=llama(6), args=_args(tmp_path, steps), train_dataset=token_dataset(8 * steps), callbacks=[cb])
    with pytest.warns(RuntimeWarning, match="SeismoCallback is off after step 1: RuntimeError: boom") as rec:
        trainer.train()
    assert trainer.state.global_step == steps
    assert sum("SeismoCallback is off" in str(w.message) for w in rec) == 1
    assert "training_step" not in trainer.__dict__  # unwrapped when switched off


def test_trainer_store_that_is_not_one_fails_before_the_first_step(tmp_path, llama, token_dataset):
    from seismo.store import StoreError

    bad = tmp_path / "notes.sqlite"
    bad.write_text("not a database")
    trainer = Trainer(model=llama(6), args=_args(tmp_path, 3), train_dataset=token_dataset(24),
                      callbacks=[SeismoCallback(store=bad, alerts=False)])
    with pytest.raises(StoreError, match="not a database"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_callback_driven_by_a_loop_of_its_own_records_without_the_loss(tmp_path, llama):
    """No Trainer on the call stack: one warning, every signal but the loss, nothing logged."""
    from transformers import TrainerControl, TrainerState

    model = llama(7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cb = SeismoCallback(alerts=False, flush_every=1)
    args, state, control = _args(tmp_path, 2), TrainerState(), TrainerControl()
    with pytest.warns(RuntimeWarning, match="cannot find the transformers.Trainer"):
        cb.on_train_begin(args, state, control, model=model, optimizer=opt)
    x = torch.randint(0, 256, (2, 16))
    for _ in range(2):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        state.global_step += 1
        control.should_log = True
        cb.on_step_end(args, state, control)
    cb.on_train_end(args, state, control)
    assert "loss" not in cb.monitor.history
    assert cb.monitor.series(f"attn/logit_max/{ATTN[0]}")[0] == [1, 2]


@pytest.mark.parametrize(("kw", "match"), [
    ({"stop_on": "nonsense"}, "stop_on: unknown event kind"),
    ({"stop_on": 3}, "stop_on: expected an event kind"),
    ({"guard": "rollback"}, "guard: must be 'skip' or None.*rollback is not offered"),
    ({"flush_evry": 3}, r"unknown option\(s\) \['flush_evry'\]"),
    ({"flush_every": 0}, "MonitorConfig.flush_every"),
    ({"log_signals": [1]}, "log_signals"),
    ({"run_name": ""}, "run_name"),
])
def test_trainer_callback_bad_options_fail_at_construction(kw, match):
    with pytest.raises(ConfigError, match=match):
        SeismoCallback(**kw)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_attention_growth_over_seeds(tmp_path, llama, token_dataset, seed, accumulation):
    steps = 200
    cb = SeismoCallback(alerts=False)
    trainer = _train(llama(seed), _args(tmp_path, steps, gradient_accumulation_steps=accumulation, seed=seed),
                     token_dataset(8 * accumulation * steps), [cb])
    s, v = cb.monitor.series("loss")
    logged = _logged(trainer, "loss")
    assert all(ours == logged[k] for k, ours in zip(s, v))
    assert any(e.kind == "attention_logit_growth" for e in cb.monitor.events)
