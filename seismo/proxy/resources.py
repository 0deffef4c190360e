"""Checks that a run can start on this machine, made before anything is built.

* :func:`check_device`: the ``device`` names a torch device that exists here (``cuda`` without
  CUDA, ``mps`` without Metal, or a typo is a one-line :class:`ConfigError`, not a traceback
  from the first ``.to(device)``).
* :func:`memory_estimate` / :func:`check_memory`: a lower bound on the memory a run needs
  (parameters, gradients and optimizer state; saved activations of one batch; the loss buffer),
  computed from the config alone (the model is built on the ``meta`` device, which allocates
  nothing), compared with the memory available now. Only a run whose *lower bound* does not fit
  is refused, so the check never stops a run that could have worked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from seismo.errors import ConfigError
from seismo.proxy.model import TinyGPT

__all__ = ["check_device", "MemoryEstimate", "memory_estimate", "available_memory", "check_memory", "format_bytes"]

_DEVICE_TYPES = ("cpu", "cuda", "mps")
_FLOAT_BYTES = 4


def check_device(device: str, field: str = "device") -> torch.device:
    """``torch.device(device)`` if that device exists on this machine, else :class:`ConfigError`."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{field}: {device!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if dev.type not in _DEVICE_TYPES:
        raise ConfigError(f"{field}: {device!r} is not supported for training; use cpu, cuda, cuda:N or mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{field}: {device!r} but CUDA is not available on this machine (torch {torch.__version__}); use device=cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{field}: {device!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{field}: {device!r} but Metal (MPS) is not available on this machine; use device=cpu")
    return dev


@dataclass(frozen=True)
class MemoryEstimate:
    """Lower bounds in bytes; ``fields`` names, per part, the config fields that size it."""

    params: int  # parameters + gradients + optimizer state
    activations: int  # what one training step keeps for the backward pass
    buffers: int  # per-step buffers sized by the number of steps
    n_params: int

    @property
    def total(self) -> int:
        return self.params + self.activations + self.buffers

    def largest(self) -> tuple[str, int]:
        parts = {"params": self.params, "activations": self.activations, "buffers": self.buffers}
        part = max(parts, key=parts.__getitem__)
        return part, parts[part]


def _optimizer_copies(name: str, momentum: float = 0.0) -> int:
    """Copies of the parameters that training keeps: the weights, the gradients, optimizer state."""
    if name == "sgd":
        return 2 + (1 if momentum else 0)
    return 4  # AdamW, SPAM, Stable-SPAM: exp_avg and exp_avg_sq


def _n_params_on_meta(build) -> int:
    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters())


def memory_estimate(cfg: Any) -> MemoryEstimate:
    """A lower bound on the memory of one run of ``cfg`` (a ``TrainConfig`` or a ``FullBatchConfig``)."""
    if getattr(cfg, "kind", "") == "fullbatch":
        return _fullbatch_estimate(cfg)
    m = cfg.model
    n_params = _n_params_on_meta(lambda: TinyGPT(m))
    batch = cfg.batch_size or cfg.data.p * cfg.data.p  # 0 = full batch of the modular table (at most p^2 pairs)
    seq = cfg.seq_len or m.block_size
    # Per layer at least: the block input, q, k, v, the attention output, the MLP hidden (mlp_ratio * d)
    # and the attention probabilities (n_head x T x T); then the logits and their gradient.
    per_token = m.n_layer * ((5 + m.mlp_ratio) * m.n_embd + m.n_head * seq) + 2 * m.vocab_size
    activations = batch * seq * per_token * _FLOAT_BYTES
    params = n_params * _optimizer_copies(cfg.optim.name, cfg.optim.momentum) * _FLOAT_BYTES
    return MemoryEstimate(params=params, activations=activations, buffers=cfg.steps * _FLOAT_BYTES, n_params=n_params)


def _fullbatch_estimate(cfg: Any) -> MemoryEstimate:
    in_dim, out_dim = (2 * cfg.p, cfg.p) if cfg.task == "modular" else (cfg.in_dim, 1)
    widths = [in_dim, *cfg.hidden, out_dim]
    n_params = sum(a * b + (b if cfg.bias else 0) for a, b in zip(widths[:-1], widths[1:]))
    item = 8 if cfg.dtype == "float64" else _FLOAT_BYTES
    n_rows = cfg.p * cfg.p if cfg.task == "modular" else 2 * cfg.n_points
    return MemoryEstimate(params=n_params * _optimizer_copies(cfg.optimizer, cfg.momentum) * item,
                          activations=n_rows * sum(widths) * item, buffers=cfg.steps * _FLOAT_BYTES, n_params=n_params)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation now (Linux ``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"  # pragma: no cover


def _fields_of(cfg: Any, part: str) -> str:
    fullbatch = getattr(cfg, "kind", "") == "fullbatch"
    if part == "buffers":
        return "steps"
    if part == "params":
        return "hidden" if fullbatch else "model size (model.n_embd, model.n_layer, model.vocab_size)"
    return "hidden or p" if fullbatch else "batch_size (with seq_len / model.block_size)"


def check_memory(cfg: Any, available: int | None = None) -> MemoryEstimate:
    """Refuse (one-line :class:`ConfigError` naming the field) a CPU run whose lower-bound memory
    exceeds the memory available now; returns the estimate. Other devices are not checked."""
    est = memory_estimate(cfg)
    if str(getattr(cfg, "device", "cpu")).split(":")[0] != "cpu":
        return est
    available = available_memory() if available is None else available
    if available is not None and est.total > available:
        part, size = est.largest()
        raise ConfigError(
            f"{_fields_of(cfg, part)}: this run needs at least {format_bytes(est.total)} of memory "
            f"({part} {format_bytes(size)}) but {format_bytes(available)} is available"
        )
    return est
