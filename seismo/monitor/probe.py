"""The probe protocol: what the Monitor asks of every signal family.

A probe is armed before the forward pass of a tracked step (it installs whatever per-step hooks
it needs), sees the forward/backward/optimizer step through those hooks, reduces what it saw to
0-d tensors on the device, and hands them over in :meth:`Probe.collect` after the optimizer
step. Nothing in a probe calls ``.item()``; the Monitor moves values to the host in batches.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import torch
import torch.nn as nn
from torch import Tensor

from seismo.monitor.schedules import Schedule

__all__ = ["Probe", "ProbeContext", "ProbeFailure", "HookSet", "module_of", "param_modules"]


class ProbeFailure(RuntimeError):
    """Raised by a probe that cannot work on this model/optimizer; the Monitor disables it."""


@dataclass
class ProbeContext:
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    # Called by a probe's hooks when they raise: disables the probe and warns once.
    on_error: Callable[[str, BaseException], None] = lambda name, exc: None
    options: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Probe(Protocol):
    """A signal family. ``name`` is the instance's name (unique within a Monitor)."""

    name: str
    schedule: Schedule

    def attach(self, ctx: ProbeContext) -> None: ...
    def arm(self, step: int) -> None: ...
    def collect(self, step: int, loss: Tensor | None) -> dict[str, Tensor]: ...
    def detach(self) -> None: ...


class HookSet:
    """A set of removable hook handles whose callbacks never raise into the user's code."""

    def __init__(self, owner: str, on_error: Callable[[str, BaseException], None]):
        self.owner = owner
        self.on_error = on_error
        self.handles: list[Any] = []

    def guard(self, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # a probe failure must never kill training
                self.on_error(self.owner, exc)
                return None

        return wrapped

    def add(self, handle: Any) -> None:
        self.handles.append(handle)

    def remove(self) -> None:
        for h in self.handles:
            try:
                h.remove()
            except Exception:
                pass
        self.handles.clear()


def module_of(param_name: str) -> str:
    """``'transformer.h.0.attn.c_attn.weight' -> 'transformer.h.0.attn.c_attn'``.

    Parametrized weights (``...parametrizations.weight.original``) map to their owning module.
    """
    parts = param_name.split(".")
    if "parametrizations" in parts:
        parts = parts[: parts.index("parametrizations")]
        return ".".join(parts) or "<root>"
    return ".".join(parts[:-1]) or "<root>"


def param_modules(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable parameters grouped by owning module name, in registration order."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(module_of(name), []).append((name, p))
    return groups


def warn_once(seen: set, key: str, message: str) -> None:
    if key not in seen:
        seen.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def zero() -> Tensor:
    return torch.zeros(())
