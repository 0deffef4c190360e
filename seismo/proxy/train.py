"""``train(config) -> RunResult``: the proxy training loop, readable top to bottom.

AdamW (optionally with independent weight decay), warm-up + cosine/linear decay, global-norm
clipping, z-loss, sequence-length warm-up, periodic validation, seeded determinism, exact
checkpoint resume, and non-finite losses ending the run with status ``diverged``. Every run is
watched by :class:`seismo.Monitor` (the same monitor users attach to their own loops).

The stored status is true on every way out: ``completed``, ``diverged``, ``interrupted`` (Ctrl-C,
SIGTERM, ``stop_at``) or ``failed`` (any exception, its one-line summary in the run's meta as
``error``). Resume leaves no hole and no duplicate in the stored rows: a checkpoint is written
only after every row up to its step is committed, and a resumed run first deletes the rows
logged after its checkpoint (they are recomputed bitwise).
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from seismo._io import atomic_torch_save, atomic_write_json
from seismo.errors import ConfigError
from seismo.mitigate import optimizers
from seismo.mitigate.guard import Guard, GuardGaveUp
from seismo.mitigate.losses import z_loss
from seismo.mitigate.param_groups import decay_groups, independent_weight_decay, mup_param_groups
from seismo.mitigate.qk_clip import QKClip
from seismo.mitigate.schedules import lr_at, seqlen_warmup
from seismo.monitor import PRESETS
from seismo.monitor.attention import find_attention_sites
from seismo.proxy.batch_text import batch_record
from seismo.proxy.checkpoint import load_resume_checkpoint
from seismo.proxy.config import from_dict, to_dict
from seismo.proxy.data import DataConfig, load_dataset
from seismo.proxy.model import GPTConfig, TinyGPT
from seismo.session import Monitor
from seismo.store import RunStore

__all__ = [
    "OptimConfig", "SeqlenWarmupConfig", "TrainConfig", "RunResult", "Terminated", "train", "save_checkpoint", "load_checkpoint",
    "error_summary", "sigterm_interrupts", "refuse_finished_run", "poison_batch", "archive_checkpoint", "checkpoint_history",
    "spike_event_steps",
]

DECAYS = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "sgd", "spam", "stable_spam")


@dataclass
class OptimConfig:
    """AdamW and its schedule. ``weight_decay`` is lambda; with ``independent_wd`` torch gets lambda / lr."""

    name: str = "adamw"  # adamw | sgd | spam | stable_spam
    lr: float = 1e-2
    momentum: float = 0.0  # sgd only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    independent_wd: bool = False
    grad_clip: float = 0.0
    warmup_steps: int = 100
    decay: str = "cosine"
    min_lr_ratio: float = 0.1
    # SPAM's spike threshold theta (clip where g^2 > theta * v). The paper's 5000 assumes beta2 = 0.999:
    # one clipped step multiplies v by about beta2 + (1 - beta2) * theta (6x there, 251x at beta2 0.95).
    spam_threshold: float = 5000.0
    # SPAM / Stable-SPAM momentum reset interval Delta T; 0 = the papers' (500 / 1000). SPAM's post-reset
    # warm-up N scales with it (the paper's N / Delta T = 150 / 500), so short runs can scale both down.
    spam_reset_interval: int = 0

    def validate(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"optim.name: must be one of {OPTIMIZERS}, got {self.name!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"optim.momentum: must be in [0, 1), got {self.momentum}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"optim.lr: must be a positive number, got {self.lr!r}")
        for f in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, f) < 1.0:
                raise ConfigError(f"optim.{f}: must be in [0, 1), got {getattr(self, f)}")
        if self.eps < 0:
            raise ConfigError(f"optim.eps: must be >= 0, got {self.eps}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay: must be >= 0, got {self.weight_decay}")
        if self.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip: must be >= 0 (0 = off), got {self.grad_clip}")
        if not self.spam_threshold >= 0:
            raise ConfigError(f"optim.spam_threshold: must be >= 0 (0 = no spike clipping), got {self.spam_threshold}")
        if not isinstance(self.spam_reset_interval, int) or isinstance(self.spam_reset_interval, bool) or self.spam_reset_interval < 0:
            raise ConfigError(f"optim.spam_reset_interval: must be an integer >= 0 (0 = the papers'), got {self.spam_reset_interval!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps: must be an integer >= 0, got {self.warmup_steps!r}")
        if self.decay not in DECAYS:
            raise ConfigError(f"optim.decay: must be one of {DECAYS}, got {self.decay!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class SeqlenWarmupConfig:
    """Sequence-length warm-up (Li et al. 2022): truncate batches to a length growing from ``start``."""

    enabled: bool = False
    start: int = 8
    steps: int = 0  # 0 means: as long as the lr warm-up
    multiple: int = 8

    def validate(self) -> None:
        if self.enabled and (self.start < 1 or self.multiple < 1 or self.steps < 0):
            raise ConfigError("seqlen_warmup: need start >= 1, multiple >= 1, steps >= 0")


@dataclass
class SpikeInjection:
    """Multiply every gradient by ``factor`` after the backward pass of the listed steps (before
    clipping): the injected-spike experiments of SPAM (Huang et al. 2025, arXiv 2501.06842).

    Spikes of known cause for ``seismo autopsy`` (PaLM, arXiv 2204.02311, section 5.1, traced its
    spikes to data batches together with the model state): ``poison_steps`` train on a batch of
    uniformly random tokens instead of the data's (a data-caused spike, see :func:`poison_batch`);
    ``lr_burst_steps`` multiply the learning rate by ``lr_burst_factor`` (a step-size spike)."""

    steps: list[int] = field(default_factory=list)
    factor: float = 1000.0
    poison_steps: list[int] = field(default_factory=list)
    lr_burst_steps: list[int] = field(default_factory=list)
    lr_burst_factor: float = 50.0

    def validate(self) -> None:
        for name in ("steps", "poison_steps", "lr_burst_steps"):
            v = getattr(self, name)
            if any((not isinstance(s, int)) or isinstance(s, bool) or s < 0 for s in v):
                raise ConfigError(f"spikes.{name}: must be a list of step numbers >= 0, got {v!r}")
        if not (self.lr_burst_factor > 0 and math.isfinite(self.lr_burst_factor)):
            raise ConfigError(f"spikes.lr_burst_factor: must be a positive number, got {self.lr_burst_factor!r}")


def poison_batch(x: torch.Tensor, y: torch.Tensor, seed: int, step: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of uniformly random tokens (inputs and targets) shaped like ``x``, seeded by
    ``(seed, step)``: what ``spikes.poison_steps`` train on. Targets the data marks ignored (-1) stay ignored."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 7919 + 12345)
    px = torch.randint(vocab_size, tuple(x.shape), generator=g).to(x.device)
    py = torch.randint(vocab_size, tuple(y.shape), generator=g).to(y.device)
    return px, torch.where(y == -1, y, py)


@dataclass
class TrainConfig:
    """Everything one proxy run needs. Presets (:mod:`seismo.proxy.presets`) return these."""

    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seqlen_warmup: SeqlenWarmupConfig = field(default_factory=SeqlenWarmupConfig)
    spikes: SpikeInjection = field(default_factory=SpikeInjection)
    z_loss: float = 0.0
    qk_clip: float = 0.0  # QK-Clip threshold tau after each optimizer step (Kimi K2, arXiv 2507.20534: 100); 0 = off
    guard: str = "none"  # "skip": seismo.Guard skips non-finite and spiking steps (see docs/GUARD.md)
    steps: int = 600
    batch_size: int = 32  # 0 = full batch (modular data)
    seq_len: int = 0  # 0 means model.block_size
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 4
    log_every: int = 10
    monitor: str = "default"  # a Monitor preset, or "none"
    monitor_every: int = 0  # 0: the preset's own schedules
    diagnose: bool = True  # run seismo's detectors live; events go to the run store
    run_name: str = "run"
    out_dir: str = ""  # run directory (config, checkpoint); "" writes no files
    store: str = ""  # SQLite run store; "" means <out_dir>/../seismo.sqlite when out_dir is set
    checkpoint_every: int = 0
    checkpoint_keep: int = 3  # periodic checkpoints kept in <out_dir>/checkpoints/ for `seismo autopsy`; 0 = all
    stop_at: int = 0  # stop (as if interrupted) after this many steps; 0 = never
    device: str = "cpu"

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        self.optim.validate()
        self.seqlen_warmup.validate()
        self.spikes.validate()
        if not isinstance(self.batch_size, int) or self.batch_size < 0 or (self.batch_size == 0 and self.data.source != "modular"):
            raise ConfigError(f"batch_size: must be a positive integer (0 = full batch, modular data only), got {self.batch_size!r}")
        for f in ("steps", "eval_batches", "log_every"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{f}: must be a positive integer, got {v!r}")
        for f in ("seq_len", "eval_every", "checkpoint_every", "checkpoint_keep", "stop_at", "monitor_every", "seed"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{f}: must be an integer >= 0, got {v!r}")
        if self.seq_len > self.model.block_size:
            raise ConfigError(f"seq_len: {self.seq_len} exceeds model.block_size {self.model.block_size}")
        if self.guard not in ("none", "skip"):
            raise ConfigError(
                f"guard: must be 'none' or 'skip' in train() (use seismo.Guard in your own loop for rollback), got {self.guard!r}"
            )
        if self.z_loss < 0:
            raise ConfigError(f"z_loss: must be >= 0, got {self.z_loss}")
        if not self.qk_clip >= 0:
            raise ConfigError(f"qk_clip: must be >= 0 (tau; 0 = off), got {self.qk_clip}")
        if self.qk_clip > 0 and (self.model.qk_norm or self.model.attention == "cosine" or self.model.sigma_reparam
                                 or self.model.attn_softcap is not None):
            raise ConfigError("qk_clip: needs logits that scale with W_q, W_k: not with model.qk_norm, cosine attention, "
                              "model.sigma_reparam or model.attn_softcap")
        if self.monitor not in PRESETS + ("none",):
            raise ConfigError(f"monitor: must be one of {PRESETS + ('none',)}, got {self.monitor!r}")
        if self.checkpoint_every and not self.out_dir:
            raise ConfigError("checkpoint_every: needs out_dir to write checkpoints into")

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        return from_dict(cls, data)


@dataclass
class RunResult:
    """What a run did. ``status`` is ``completed``, ``diverged`` or ``interrupted`` (``stop_at``);
    a run that fails or is interrupted by a signal raises instead, after storing its status."""

    status: str
    steps_done: int
    train_loss: np.ndarray
    val_loss: list[tuple[int, float]]
    final_train_loss: float
    final_val_loss: float
    max_attn_logit: float
    history: dict[str, tuple[np.ndarray, np.ndarray]]
    config: dict
    meta: dict
    wall_time: float
    run_dir: str | None = None
    run_id: int | None = None
    store: str | None = None
    diverged_at: int | None = None
    events: list = field(default_factory=list)

    def series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in self.history:
            raise KeyError(f"no signal {name!r}; recorded: {sorted(self.history)[:30]}")
        return self.history[name]


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` atomically (see :func:`seismo._io.atomic_write`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(state, path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``: tensors and plain containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


class Terminated(KeyboardInterrupt):
    """Raised in the training thread when the process gets SIGTERM: handled like Ctrl-C."""


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While the body runs in the main thread, SIGTERM raises :class:`Terminated` there.

    The previous handler is restored afterwards. In another thread (signals are only delivered
    to the main one) or where handlers cannot be set, the body runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise Terminated(f"terminated by signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, _raise)
    except (ValueError, OSError):  # e.g. an interpreter that does not own signal handling
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def error_summary(exc: BaseException, limit: int = 300) -> str:
    """``"Type: first line of the message"``, at most ``limit`` characters: what a failed run stores."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def exit_status(exc: BaseException) -> str:
    """The stored status of a run ended by ``exc``: ``interrupted`` for Ctrl-C / SIGTERM, else ``failed``."""
    return "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"


def first_nonfinite_step(losses: torch.Tensor, start: int, stop: int) -> int | None:
    """The first step in ``[start, stop)`` whose recorded loss is not finite, else None.

    ``losses`` holds one loss per step, on the training device; one host sync per call, which the
    loops make once every ``log_every`` steps."""
    bad = ~torch.isfinite(losses[start:stop])
    return start + int(bad.nonzero()[0, 0]) if bool(bad.any()) else None


def final_loss(train_loss: np.ndarray, last: int = 20) -> float:
    """Mean of the last ``last`` recorded losses: a run's final train loss (nan if any is not finite)."""
    tail = train_loss[max(0, len(train_loss) - last):]
    return float(np.mean(tail)) if len(tail) and np.all(np.isfinite(tail)) else math.nan


def build_optimizer(model: TinyGPT, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer ``cfg.name`` over weight-decay (or muP) parameter groups."""
    wd = independent_weight_decay(cfg.weight_decay, cfg.lr) if cfg.independent_wd else cfg.weight_decay
    if model.config.parametrization == "mup":
        groups = mup_param_groups(model, wd, model.config.width_mult)
    else:
        groups = decay_groups(model, wd)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.name in ("spam", "stable_spam"):
        reset = cfg.spam_reset_interval
        if cfg.name == "spam":
            gap = dict(update_proj_gap=reset, warmup_epoch=max(1, round(150 * reset / 500))) if reset else {}
            return optimizers.spam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, threshold=cfg.spam_threshold, **gap)
        return optimizers.stable_spam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                      **(dict(update_proj_gap=reset) if reset else {}))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


@torch.no_grad()
def evaluate(model: TinyGPT, ds, cfg: TrainConfig, seq_len: int) -> float:
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(cfg.eval_batches):
        x, y = ds.batch("val", cfg.seed, i, cfg.batch_size, seq_len, cfg.device)
        total += float(model(x, y)[1])
    model.train(was_training)
    return total / cfg.eval_batches


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    listeners: list[Callable[[int, dict[str, float]], None]] | None = None,
    on_event: Callable[[list], None] | None = None,
) -> RunResult:
    """Train TinyGPT as ``cfg`` says. ``on_log(step, info)`` is called every ``log_every`` steps
    with host values (loss, lr, seq_len, max attention logit, ...). With ``resume``, continue from
    ``<out_dir>/checkpoint.pt`` if it exists, reproducing the uninterrupted run exactly."""
    cfg.validate()
    t_start = time.time()
    device = torch.device(cfg.device)
    run_dir = Path(cfg.out_dir) if cfg.out_dir else None
    ckpt_path = run_dir / "checkpoint.pt" if run_dir else None
    if resume and run_dir is not None:
        refuse_finished_run(run_dir)
    ds = load_dataset(cfg.data)
    if cfg.model.vocab_size != ds.vocab_size:
        cfg.model.vocab_size = ds.vocab_size  # the data decides the vocabulary
    seq_len = cfg.seq_len or cfg.model.block_size

    torch.manual_seed(cfg.seed)
    model = TinyGPT(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg.optim)
    losses = torch.full((cfg.steps,), float("nan"), device=device)
    val_losses: list[tuple[int, float]] = []
    start = 0
    run_id = None
    run_uid = None  # names the stored run before it has an id: in the step-0 checkpoint and the run's meta
    ck_detectors: dict = {}
    ck_probes: dict = {}
    if resume and ckpt_path is not None and ckpt_path.exists():
        ck = load_resume_checkpoint(ckpt_path, cfg.to_dict(), model, optimizer)  # a bad checkpoint is one ConfigError line
        torch.set_rng_state(ck["rng"])
        start = int(ck["step"])
        losses[:start] = ck["losses"][:start].to(device)
        val_losses = [(int(s), float(v)) for s, v in ck["val"]]
        run_id = ck.get("run_id")
        run_uid = ck.get("run_uid")
        ck_detectors = ck.get("detectors") or {}
        ck_probes = ck.get("probes") or {}
    elif ckpt_path is not None and cfg.checkpoint_every:
        # Resumable from the start: a kill before the first periodic checkpoint resumes here into
        # the same stored run (found by run_uid), instead of leaving it `running` forever.
        run_uid = uuid.uuid4().hex
        _checkpoint(ckpt_path, model, optimizer, 0, losses, val_losses, None, run_uid=run_uid, config=cfg.to_dict())
        archive_checkpoint(ckpt_path, 0, cfg.checkpoint_keep)
    run_uid = run_uid or uuid.uuid4().hex

    meta = dict(data=ds.meta, n_params=model.num_params(), n_params_total=model.num_params(False), torch=torch.__version__, run_uid=run_uid,
                torch_threads=torch.get_num_threads())  # seismo autopsy replays with as many threads (bitwise check)
    store_path = cfg.store or (str(run_dir.parent / "seismo.sqlite") if run_dir else "")
    if run_dir:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(run_dir / "config.json", cfg.to_dict())
    if resume and store_path and cfg.monitor != "none":
        run_id = _forget_rows_after_checkpoint(store_path, run_id, run_uid, start)
    monitor = None
    if cfg.monitor != "none":
        monitor = Monitor(
            model, optimizer, store=store_path or None, run_name=cfg.run_name, probes=cfg.monitor,
            every=cfg.monitor_every or None, config=cfg.to_dict(), meta=meta, flush_every=cfg.log_every,
            listeners=listeners or (), start_step=start, run_id=run_id, diagnose=cfg.diagnose, on_event=on_event, alerts=False,
        )
        if resume and monitor.diagnoser is not None and ck_detectors:
            monitor.diagnoser.load_state_dict(ck_detectors)
        if resume:
            _load_probe_states(monitor, ck_probes, device)
        run_id = monitor.run_id

    guard = None
    step = start
    try:
        with sigterm_interrupts():
            if cfg.guard == "skip":
                guard = Guard(model, optimizer, policy="skip", max_grad_norm=cfg.optim.grad_clip, monitor=monitor, zero_grad=False)
            qk_clip = qk_clipper(model, cfg.qk_clip) if cfg.qk_clip > 0 else None  # after the monitor: see qk_clipper
            status, diverged_at, step, steps_done = _train_loop(
                cfg, ds, model, optimizer, losses, val_losses, seq_len, start, monitor, guard, ckpt_path, run_id, run_uid, on_log,
                qk_clip,
            )
            if guard is not None:
                guard.close()
                meta["guard"] = dict(guard.stats)
            if status == "completed" and not (val_losses and val_losses[-1][0] == steps_done):
                _final_validation(model, ds, cfg, seq_len, val_losses, monitor, steps_done)
            if status == "interrupted" and ckpt_path is not None:
                _checkpoint(ckpt_path, model, optimizer, steps_done, losses, val_losses, run_id, monitor, run_uid, cfg.to_dict())

            train_loss = losses[:steps_done].cpu().numpy()
            final_train = final_loss(train_loss)
            final_val = val_losses[-1][1] if status == "completed" and val_losses else math.nan
            history: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            if monitor is not None:
                monitor.close(status, meta=dict(final_train_loss=final_train, final_val_loss=final_val, steps_done=steps_done))
                history = {k: (np.asarray(s), np.asarray(v)) for k, (s, v) in monitor.history.items()}
    except BaseException as exc:
        close_after_exception(exc, monitor, guard, run_dir, step, run_id, t_start)
        raise
    result = RunResult(
        status=status, steps_done=steps_done, train_loss=train_loss, val_loss=val_losses,
        final_train_loss=final_train, final_val_loss=final_val,
        max_attn_logit=_max_attn_logit(history, store_path if start > 0 else "", run_id), history=history,
        config=cfg.to_dict(), meta=meta, wall_time=time.time() - t_start,
        run_dir=str(run_dir) if run_dir else None, run_id=run_id, store=store_path or None, diverged_at=diverged_at,
        events=list(monitor.events) if monitor is not None else [],
    )
    if run_dir:  # after the stored status: a kill in between resumes from the last checkpoint
        _write_json(run_dir / "result.json", dict(
            status=status, steps_done=steps_done, final_train_loss=final_train, final_val_loss=final_val,
            max_attn_logit=result.max_attn_logit, diverged_at=diverged_at, wall_time=result.wall_time, run_id=run_id,
        ))
    return result


def _train_loop(cfg, ds, model, optimizer, losses, val_losses, seq_len, start, monitor, guard, ckpt_path, run_id, run_uid, on_log,
                qk_clip=None):
    """Steps ``start .. cfg.steps - 1``; returns ``(status, diverged_at, last step, steps done)``.
    ``qk_clip``: called after each optimizer step (see :func:`qk_clipper`)."""
    status, diverged_at = "completed", None
    slw = cfg.seqlen_warmup
    spike_steps = set(cfg.spikes.steps)
    poison_steps, burst_steps = set(cfg.spikes.poison_steps), set(cfg.spikes.lr_burst_steps)  # seismo autopsy's known causes
    slw_steps = slw.steps or max(1, cfg.optim.warmup_steps)
    device = losses.device
    model.train()
    step = start
    for step in range(start, cfg.steps):
        # 1. schedules: pure functions of the step
        lr = lr_at(step, cfg.optim.lr, cfg.optim.warmup_steps, cfg.steps, cfg.optim.decay, cfg.optim.lr * cfg.optim.min_lr_ratio)
        if step in burst_steps:
            lr = lr * cfg.spikes.lr_burst_factor
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        cur_len = seqlen_warmup(step, min(slw.start, seq_len), seq_len, slw_steps, slw.multiple) if slw.enabled else seq_len

        # 2. forward / backward / step
        x, y = ds.batch("train", cfg.seed, step, cfg.batch_size, seq_len, device)
        if step in poison_steps:
            x, y = poison_batch(x, y, cfg.seed, step, cfg.model.vocab_size)
        x, y = x[:, :cur_len], y[:, :cur_len]
        logits, loss = model(x, y)
        total = loss + z_loss(logits, cfg.z_loss, ignore_mask=(y == -1)) if cfg.z_loss > 0 else loss
        optimizer.zero_grad(set_to_none=True)
        if step in spike_steps:
            total = total * cfg.spikes.factor  # every gradient x factor, seen by the monitor like a real spike
        total.backward()
        if guard is not None:
            try:
                guard.step(loss)  # clips, then steps the optimizer or skips the step entirely
            except GuardGaveUp:
                losses[step] = float("nan")
                status, diverged_at = "diverged", step
                break
        else:
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
        if qk_clip is not None:  # the logits of this step's forward, rescaling the weights just updated
            qk_clip()
        losses[step] = loss.detach()
        if monitor is not None:  # which sequences formed the batch and their losses: a spike names its batch
            monitor.step(loss, **batch_record(ds, cfg.seed, step, seq_len, logits, y, step in poison_steps))

        # 3. every log_every steps: one host sync, divergence check, progress
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            bad_step = first_nonfinite_step(losses, max(0, done - cfg.log_every), done)
            if bad_step is not None:
                status, diverged_at = "diverged", bad_step
            if on_log is not None:
                info = dict(loss=float(losses[step]), lr=lr, seq_len=cur_len)
                if monitor is not None:
                    monitor.flush()  # no-op when the flush interval just fired
                    info["attn_logit_max"] = monitor.latest("attn/logit_max/")
                    info["logz_mean"] = monitor.latest("logits/logz_mean")
                on_log(step, info)
            if status == "diverged":
                break
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            v = evaluate(model, ds, cfg, seq_len)
            val_losses.append((done, v))
            if monitor is not None:
                monitor.log({"val/loss": v}, step=step)
        if ckpt_path is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            if done == cfg.steps:  # the final validation goes into the last checkpoint: a resume does not redo (and log) it
                _final_validation(model, ds, cfg, seq_len, val_losses, monitor, done)
            _checkpoint(ckpt_path, model, optimizer, done, losses, val_losses, run_id, monitor, run_uid, cfg.to_dict())
            archive_checkpoint(ckpt_path, done, cfg.checkpoint_keep, spike_event_steps(monitor))
        if cfg.stop_at and done >= cfg.stop_at and done < cfg.steps:
            status = "interrupted"
            break
    steps_done = step + 1 if cfg.steps > start else start
    return status, diverged_at, step, steps_done


def qk_clipper(model: TinyGPT, tau: float) -> Callable[[], Any]:
    """QK-Clip (MuonClip, Kimi Team 2025, "Kimi K2", arXiv 2507.20534, section 2.1) for ``train``:
    returns a function to call after each optimizer step, which rescales W_q, W_k of every head whose
    max pre-softmax logit in that step's training forward exceeded ``tau`` by sqrt(tau / S_h) each.

    The per-head maxima come from the attention taps the monitor reads (no second forward), over
    every sequence of the batch, as in Kimi K2 (a subsample would miss the largest logits). The taps
    compute their logits for as many sequences as the last site installed on them asked for, so this
    is installed after the monitor: in a run with QK-Clip the monitor's ``attn/*`` signals then cover
    the whole batch, instead of the first ``attention_sample`` sequences (2 by default)."""
    qk = QKClip(model, tau=tau, max_batch=1 << 20)
    qk.attach(find_attention_sites(model))
    return qk.clip


def _max_attn_logit(history: dict, store_path: str, run_id: int | None) -> float:
    """The run's largest attention logit: from the store for a resumed run (``history`` holds only
    the steps since the resume), else from ``history``."""
    prefix = "attn/logit_max/"
    if store_path and run_id is not None and Path(store_path).exists():
        with RunStore(store_path) as store:
            return store.metric_max(int(run_id), prefix)
    attn = [np.nanmax(v) for k, (_, v) in history.items() if k.startswith(prefix) and len(v) and np.isfinite(v).any()]
    return float(max(attn)) if attn else math.nan


def _final_validation(model, ds, cfg, seq_len, val_losses, monitor, steps_done: int) -> None:
    v = evaluate(model, ds, cfg, seq_len)  # uses no random numbers: it may run before or after a checkpoint
    val_losses.append((steps_done, v))
    if monitor is not None:
        monitor.log({"val/loss": v}, step=steps_done - 1)


def refuse_finished_run(run_dir: Path) -> None:
    """Raise :class:`ConfigError` if ``run_dir/result.json`` says the run finished (``completed`` or
    ``diverged``): resuming it would redo nothing and overwrite its result. ``train(resume=True)``
    calls it first; a CLI may call it before it draws anything."""
    path = run_dir / "result.json"
    try:
        status = json.loads(path.read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return  # no result yet (or an unreadable one): the checkpoint decides
    if status in ("completed", "diverged"):
        raise ConfigError(f"resume: the run in {run_dir} already finished ({status}, see {path}); nothing to resume")


def _forget_rows_after_checkpoint(store_path: str, run_id: int | None, run_uid: str | None, step: int) -> int | None:
    """Delete the stored rows of the resumed run at ``step`` and later (they are recomputed) and
    return its run id: the checkpoint's, or the run whose meta carries ``run_uid`` (a kill between
    creating the run and its first checkpoint)."""
    if not Path(store_path).exists():
        return run_id
    with RunStore(store_path) as store:
        if run_id is None and run_uid:
            found = [r.run_id for r in store.runs() if r.meta.get("run_uid") == run_uid]
            run_id = found[-1] if found else None
        if run_id is not None:
            stored_uid = store.find_run(int(run_id)).meta.get("run_uid")
            if run_uid and stored_uid and stored_uid != run_uid:  # the run was deleted and its id reused
                raise ConfigError(f"resume: run {run_id} in {store_path} is not the run this checkpoint belongs to")
            store.delete_rows_from(int(run_id), step)
    return run_id


def close_after_exception(exc: BaseException, monitor, guard=None, run_dir: Path | None = None, step: int = 0, run_id=None,
                          t_start: float = 0.0) -> None:
    """Store the true status of a run ended by ``exc`` (``interrupted`` or ``failed`` with a
    one-line summary); never raises, so the original exception is what the caller sees."""
    status, error = exit_status(exc), error_summary(exc)
    if monitor is not None:
        step = monitor.step_count  # steps the monitor recorded, the failing one included if it got that far
    parts = [("guard", guard.close)] if guard is not None else []
    if monitor is not None:
        parts.append(("run store", lambda: monitor.close(status, meta=dict(error=error, steps_done=step))))
    for what, close in parts:
        try:
            close()
        except Exception as close_exc:  # noqa: BLE001 - the run's own exception is the one to report
            warnings.warn(f"seismo: closing the {what} after {error} failed: {close_exc!r}", RuntimeWarning, stacklevel=3)
    if run_dir is not None:
        try:
            _write_json(run_dir / "result.json", dict(status=status, steps_done=step, error=error, run_id=run_id,
                                                      wall_time=time.time() - t_start))
        except OSError as write_exc:
            warnings.warn(f"seismo: writing {run_dir / 'result.json'} failed: {write_exc}", RuntimeWarning, stacklevel=3)


def _probe_states(monitor) -> dict:
    """``{probe name: state}`` of the probes that keep state across steps (e.g. the loss probe's
    moving mean): a resumed run restores them, so its rows equal the uninterrupted run's."""
    return {p.name: p.state_dict() for p in monitor.probes if callable(getattr(p, "state_dict", None))}


def _load_probe_states(monitor, states: dict, device: torch.device) -> None:
    for p in monitor.probes:
        state = states.get(p.name)
        if state is not None and callable(getattr(p, "load_state_dict", None)):
            p.load_state_dict({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in state.items()})


def _commit_records(monitor) -> None:
    """Flush the monitor, then wait until every sink has written what it got: the run store's
    ``flush`` returns once its writer has committed, so the rows of every finished step are on
    disk. Only then may a checkpoint claim those steps."""
    monitor.flush()
    monitor.fanout.flush()


def _checkpoint(path, model, optimizer, step, losses, val_losses, run_id, monitor=None, run_uid=None, config=None) -> None:
    """Save the state after ``step`` steps (and the run's config), once every row up to that step is committed."""
    detectors, probes = {}, {}
    if monitor is not None:
        _commit_records(monitor)  # also: the detectors have seen every step up to the checkpoint
        if monitor.diagnoser is not None:
            detectors = monitor.diagnoser.state_dict()
        probes = _probe_states(monitor)
    save_checkpoint(path, {
        "detectors": detectors,
        "probes": probes,
        "step": step,
        "model": model.state_dict(),
        "optim": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "losses": losses[:step].detach().cpu(),
        "val": [[s, v] for s, v in val_losses],
        "run_id": run_id,
        "run_uid": run_uid,
        "config": config,
    })


def _write_json(path: Path, data: dict) -> None:
    atomic_write_json(path, data)


# --- checkpoint history for `seismo autopsy` ------------------------------------------------

CHECKPOINT_HISTORY = "checkpoints"  # <out_dir>/checkpoints/step-000300.pt: periodic checkpoints, newest `checkpoint_keep`


SPIKE_KINDS = ("spike", "nonfinite", "divergence")  # event kinds whose preceding checkpoints are kept for an autopsy


def spike_event_steps(monitor) -> list[int]:
    """The steps of the monitor's spike, non-finite and divergence events so far."""
    if monitor is None:
        return []
    return sorted({int(e.step) for e in monitor.events if any(k in e.kind for k in SPIKE_KINDS)})


def archive_checkpoint(ckpt_path: Path, step: int, keep: int, protect: list[int] | tuple[int, ...] = ()) -> None:
    """Keep ``ckpt_path`` (just written for ``step``) as ``checkpoints/step-<step>.pt`` (a hard link,
    or a copy where links are not possible) and delete all but the newest ``keep`` (0 = keep all)
    and, for each step in ``protect`` (spike events), the two newest checkpoints before it: what
    ``seismo autopsy`` of that spike starts from."""
    history = ckpt_path.parent / CHECKPOINT_HISTORY
    history.mkdir(exist_ok=True)
    target = history / f"step-{step:06d}.pt"
    tmp = history / f".step-{step:06d}.pt.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(ckpt_path, tmp)
    except OSError:
        import shutil

        shutil.copyfile(ckpt_path, tmp)
    os.replace(tmp, target)
    if keep:
        kept = sorted(checkpoint_history(ckpt_path.parent).items())
        needed = {s for e in protect for s in [s for s, _ in kept if s < e][-2:]}
        for s, old in kept[:-keep]:
            if s not in needed:
                old.unlink(missing_ok=True)


def checkpoint_history(run_dir: str | os.PathLike) -> dict[int, Path]:
    """``{step: path}`` of the periodic checkpoints kept in ``run_dir/checkpoints/``."""
    out = {}
    for p in (Path(run_dir) / CHECKPOINT_HISTORY).glob("step-*.pt"):
        try:
            out[int(p.stem.split("-", 1)[1])] = p
        except ValueError:
            continue
    return out
