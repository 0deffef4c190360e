"""One replay of a spike autopsy: restore a checkpoint, train the window again with one change.

A :class:`Loop` is what any training loop gives the autopsy (``make_batch(i)``, a builder for model
and optimizer, the loss, the learning-rate schedule); a :class:`ReplaySpec` is one way to replay the
window (same data, other data, a lower learning rate, a mitigation switched on at the checkpoint).
:func:`run_replay` runs one spec in the current process and returns a picklable record, so replays
run in parallel on the sweep backends (:mod:`seismo.proxy.autopsy`).

The step is the proxy loop's (:func:`seismo.proxy.train.train`), operation for operation, so that a
same-data replay of a proxy run reproduces its losses bitwise on the same machine and thread count:
learning rate, batch, forward, z-loss, ``zero_grad``, gradient scaling, backward, clipping, step.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Protocol

import torch

from seismo.mitigate.losses import z_loss
from seismo.mitigate.optimizers import spam_threshold_for_beta2
from seismo.mitigate.qk_clip import QKClip
from seismo.monitor.attention import find_attention_sites
from seismo.proxy.train import error_summary
from seismo.session import Monitor

__all__ = ["Loop", "ReplaySpec", "run_replay", "data_index", "spam_clip_", "restore", "qk_clipper"]

DATA_MODES = ("same", "other", "reorder", "skip")


class Loop(Protocol):
    """What a training loop gives the autopsy. Attributes and methods:

    * ``make_batch(i)``: the batch of data index ``i`` (a step trains on ``make_batch(step)``);
    * ``build()``: a fresh ``(model, optimizer)`` whose state dicts the checkpoint's fit;
    * ``loss_fn(model, batch, step)``: the loss to record and backpropagate, or ``(loss, logits)``
      or ``(loss, logits, ignore_mask)`` (logits let the autopsy add z-loss; ``ignore_mask`` marks
      the rows z-loss leaves out);
    * ``lr_at(step)``: the learning rate of ``step`` (each group gets it times its ``lr_scale``),
      or None to keep the checkpoint's learning rates;
    * ``grad_scale(step)``: a factor on the loss before backward (1.0 = none);
    * ``z_loss`` and ``grad_clip``: the loop's own coefficient and clipping norm (0 = off);
    * ``monitor``: the seismo monitor preset the replays record with (``"none"`` for no signals).
    """

    z_loss: float
    grad_clip: float
    monitor: str

    def make_batch(self, i: int) -> Any: ...
    def build(self) -> tuple[torch.nn.Module, torch.optim.Optimizer]: ...
    def loss_fn(self, model: torch.nn.Module, batch: Any, step: int) -> Any: ...
    def lr_at(self, step: int) -> float | None: ...
    def grad_scale(self, step: int) -> float: ...


@dataclass(frozen=True)
class ReplaySpec:
    """One replay: which data, and what is switched on at the checkpoint. Defaults change nothing."""

    name: str
    kind: str = "control"  # control | data | lr | mitigation
    data: str = "same"  # same | other (window's batches replaced) | reorder (window reversed) | skip (spike's batches dropped)
    lr_scale: float = 1.0
    z_loss: float = 0.0  # 0: the loop's own
    grad_clip: float = 0.0  # 0: the loop's own
    beta2: float = 0.0  # 0: unchanged
    eps: float = 0.0  # 0: unchanged
    spam_threshold: float = 0.0  # SPAM-style clipping of g where g^2 > threshold * v (0 = off)
    qk_clip: float = 0.0  # QK-Clip threshold tau (0 = off)
    description: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def data_index(spec: ReplaySpec, step: int, start: int, spike: int, skip_from: int, other_offset: int) -> int:
    """The data index a replay trains on at ``step``.

    ``other``: the window's batches (steps ``start..spike``) replaced by the batches ``other_offset``
    further on; ``reorder``: the window's batches in reverse order; ``skip``: the batches
    ``skip_from..spike`` dropped from the stream (PaLM's skip, arXiv 2204.02311), later steps take
    the batches after them; ``same``: ``step``."""
    if spec.data == "other" and start <= step <= spike:
        return step + other_offset
    if spec.data == "reorder" and start <= step <= spike:
        return start + spike - step
    if spec.data == "skip" and step >= skip_from:
        return step + (spike - skip_from + 1)
    return step


@torch.no_grad()
def spam_clip_(optimizer: torch.optim.Optimizer, threshold: float) -> int:
    """SPAM's spike-aware clipping (Huang et al. 2025, arXiv 2501.06842, Algorithm 1): every gradient
    entry with ``g^2 > threshold * v`` (``v`` Adam's second moment, ``exp_avg_sq``) becomes
    ``sign(g) * sqrt(threshold * v)``. Parameters without ``v`` yet are left alone. Returns how many
    entries were clipped (one host sync: the autopsy is not a hot path)."""
    clipped = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            v = optimizer.state.get(p, {}).get("exp_avg_sq")
            if p.grad is None or v is None:
                continue
            bound = (threshold * v).sqrt()
            spike = p.grad.abs() > bound
            clipped += int(spike.sum())
            p.grad.copy_(torch.where(spike, p.grad.sign() * bound, p.grad))
    return clipped


def restore(loop: Loop, checkpoint: Mapping[str, Any]) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """``loop.build()`` with the checkpoint's model and optimizer states (and its RNG state, if any).

    The optimizer state is copied first: ``Optimizer.load_state_dict`` keeps tensors that already
    have the right dtype and device, and the next step would update the checkpoint in place."""
    model, optimizer = loop.build()
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(copy.deepcopy(checkpoint["optim"]))
    if isinstance(checkpoint.get("rng"), torch.Tensor):
        torch.set_rng_state(checkpoint["rng"])
    return model, optimizer


def _switch_on(spec: ReplaySpec, optimizer: torch.optim.Optimizer) -> None:
    """Apply the spec's optimizer changes at the checkpoint (the state m, v is kept)."""
    for group in optimizer.param_groups:
        if spec.beta2 and "betas" in group:
            group["betas"] = (group["betas"][0], spec.beta2)
        if spec.eps and "eps" in group:
            group["eps"] = spec.eps


def qk_clipper(model: torch.nn.Module, tau: float) -> Callable[[], Any]:
    """QK-Clip (Kimi K2, arXiv 2507.20534) on ``model``, fed by the attention logits of each training
    forward (no second forward); call the returned function after each optimizer step. Raises
    :class:`~seismo.errors.ConfigError` where it does not apply (qk-norm, no attention)."""
    qk = QKClip(model, tau=tau, max_batch=1 << 20)  # every sequence of the batch
    qk.attach(find_attention_sites(model))
    return qk.clip


def _loss_and_logits(out: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    if isinstance(out, (tuple, list)):
        return out[0], out[1], (out[2] if len(out) > 2 else None)
    return out, None, None


def run_replay(loop: Loop, checkpoint: Mapping[str, Any] | str, spec: ReplaySpec, *, start: int, stop: int, spike: int,
               skip_from: int, other_offset: int, threads: int = 0, run_name: str = "replay") -> dict:
    """Train steps ``start .. stop - 1`` from ``checkpoint`` (taken after ``start`` steps) as ``spec``
    says; returns ``{name, status, steps, losses, history, events, error, wall_time}`` (picklable).

    Stops at the first non-finite loss (status ``diverged``). Never raises: a failure is status
    ``failed`` with its one-line summary in ``error``."""
    t0 = time.time()
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _replay(loop, checkpoint, spec, start, stop, spike, skip_from, other_offset, run_name, t0)
    finally:
        torch.set_num_threads(threads_before)


def _replay(loop, checkpoint, spec: ReplaySpec, start: int, stop: int, spike: int, skip_from: int, other_offset: int, run_name: str,
            t0: float) -> dict:
    steps: list[int] = []
    losses: list[float] = []
    monitor = None
    status, error = "completed", ""
    try:
        if isinstance(checkpoint, str):
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model, optimizer = restore(loop, checkpoint)
        _switch_on(spec, optimizer)
        clip_qk = qk_clipper(model, spec.qk_clip) if spec.qk_clip else None
        base_lrs = [g["lr"] for g in optimizer.param_groups]
        coef = spec.z_loss or loop.z_loss
        clip = spec.grad_clip or loop.grad_clip
        if loop.monitor != "none":
            monitor = Monitor(model, optimizer, probes=loop.monitor, start_step=start, diagnose=True, alerts=False,
                              run_name=run_name, flush_every=max(1, stop - start), every=getattr(loop, "monitor_every", 0) or None)
        model.train()
        for step in range(start, stop):
            lr = loop.lr_at(step)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = (base if lr is None else lr * group.get("lr_scale", 1.0)) * spec.lr_scale
            batch = loop.make_batch(data_index(spec, step, start, spike, skip_from, other_offset))
            loss, logits, ignore = _loss_and_logits(loop.loss_fn(model, batch, step))
            total = loss
            if coef > 0:
                if logits is None:
                    raise ValueError("z-loss needs loss_fn to return (loss, logits)")
                total = loss + z_loss(logits, coef, ignore_mask=ignore)
            optimizer.zero_grad(set_to_none=True)
            scale = loop.grad_scale(step)
            if scale != 1.0:
                total = total * scale
            total.backward()
            if spec.spam_threshold:
                spam_clip_(optimizer, spec.spam_threshold)
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            if clip_qk is not None:
                clip_qk()
            value = float(loss.detach())
            steps.append(step)
            losses.append(value)
            if monitor is not None:
                monitor.step(loss)
            if not math.isfinite(value):
                status = "diverged"
                break
    except Exception as exc:  # noqa: BLE001 - one failing replay is recorded as failed; the autopsy goes on
        status, error = "failed", error_summary(exc)
    history: dict[str, tuple[list[int], list[float]]] = {}
    events: list[dict] = []
    if monitor is not None:
        try:
            monitor.close(status)
            history = {k: (list(map(int, s)), list(map(float, v))) for k, (s, v) in monitor.history.items()}
            events = [e.to_dict() for e in monitor.events]
        except Exception as exc:  # noqa: BLE001 - the losses are the result; signals are a bonus
            warnings.warn(f"seismo autopsy: replay {spec.name!r}: closing its monitor failed: {exc!r}", RuntimeWarning, stacklevel=2)
    return dict(name=spec.name, spec=spec.to_dict(), status=status, error=error, steps=steps, losses=losses,
                history=history, events=events, wall_time=time.time() - t0)


def default_spam_threshold(beta2: float) -> float:
    """SPAM's threshold (5000 at beta2 0.999) rescaled to ``beta2`` (see
    :func:`seismo.mitigate.optimizers.spam_threshold_for_beta2`)."""
    return spam_threshold_for_beta2(beta2)
