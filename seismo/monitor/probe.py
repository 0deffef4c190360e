"""What the Monitor asks of every signal family: the :class:`Probe` protocol, and
:class:`HookedProbe`, the base class that owns a probe's bookkeeping.

A probe is armed before the forward pass of a tracked step (it installs whatever per-step hooks
it needs), sees the forward/backward/optimizer step through those hooks, reduces what it saw to
0-d tensors on the device, and hands them over in :meth:`Probe.collect` after the optimizer
step. Nothing in a probe calls ``.item()``; the Monitor moves values to the host in batches.

Any object with the four methods below is a probe. The built-in ones derive from
:class:`HookedProbe` (the shape of Cockpit's ``ByproductQuantity``: a quantity declares what it needs
and computes it, the base class does the rest) and write three things at most: :meth:`~HookedProbe.setup`
(check the model and optimizer, register hooks kept for the probe's life), :meth:`~HookedProbe.install`
(register this step's hooks) and :meth:`~HookedProbe.compute` (values known only at collect time).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import torch
import torch.nn as nn
from torch import Tensor

from seismo.monitor.tracking import Schedule, every

__all__ = [
    "Probe", "HookedProbe", "ProbeContext", "ProbeFailure", "HookSet", "module_of", "param_modules", "warn_once",
]


class ProbeFailure(RuntimeError):
    """Raised by a probe that cannot work on this model/optimizer; the Monitor disables it."""


def _ignore_error(name: str, exc: BaseException) -> None:
    del name, exc


@dataclass
class ProbeContext:
    """What a probe is attached to. ``on_error(probe_name, exc)`` is called by a probe's hooks when
    they raise; the Monitor's disables the probe and warns once."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    on_error: Callable[[str, BaseException], None] = _ignore_error


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
        self._warned = False

    def guard(self, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - a probe failure must never kill training; on_error disables the probe and warns
                self.on_error(self.owner, exc)
                return None

        return wrapped

    def add(self, handle: Any) -> None:
        self.handles.append(handle)

    def remove(self) -> None:
        handles, self.handles = self.handles, []
        for h in handles:
            try:
                h.remove()
            except Exception as exc:  # noqa: BLE001 - a custom site's handle may raise; the others must still go. Warned once.
                if not self._warned:
                    self._warned = True
                    warnings.warn(f"seismo: probe '{self.owner}': removing a hook failed ({type(exc).__name__}: {exc})", RuntimeWarning,
                                  stacklevel=2)


class HookedProbe:
    """Base class of the built-in probes: it owns the hooks, the arming state and the values.

    A concrete probe sets ``name`` and ``schedule`` through ``__init__`` and overrides what it needs:

    - :meth:`setup` (at attach): check the model/optimizer (raise :class:`ProbeFailure` when the
      probe cannot work) and register hooks that live as long as the probe with ``self.hooks``;
    - :meth:`install` (at arm, before a tracked step): register this step's hooks with
      ``self.step_hooks``; they are removed at collect (:meth:`release`);
    - hooks write their 0-d tensors with :meth:`put` (check ``self.armed`` in long-lived hooks);
    - :meth:`compute` (at collect): values that need the loss or the finished step.

    Every hook callback must be wrapped with :meth:`guard`, so that a failure disables the probe
    (one warning) instead of reaching the training loop.
    """

    default_every = 1

    def __init__(self, name: str, schedule: Schedule | None = None):
        self.name = name
        self.schedule = schedule or every(self.default_every)
        self.armed = False
        self.values: dict[str, Tensor] = {}
        self.hooks = HookSet(name, _ignore_error)
        self.step_hooks = HookSet(name, _ignore_error)

    # --- what a concrete probe overrides ---------------------------------------------------
    def setup(self, ctx: ProbeContext) -> None:
        """Check what the probe needs and register the hooks kept for its whole life."""

    def install(self, step: int) -> None:
        """Register the hooks of the tracked step ``step`` (with ``self.step_hooks``)."""

    def compute(self, step: int, loss: Tensor | None) -> Mapping[str, Tensor]:
        """Values computed at collect time, added to those the hooks put."""
        del step, loss
        return {}

    def release(self, step: int) -> None:
        """Remove this step's hooks (at collect). Override to keep them for the next step."""
        del step
        self.step_hooks.remove()

    # --- the bookkeeping ---------------------------------------------------------------------
    def guard(self, fn: Callable) -> Callable:
        """``fn`` wrapped so that an exception disables this probe instead of propagating."""
        return self.hooks.guard(fn)

    def put(self, values: Mapping[str, Tensor]) -> None:
        self.values.update(values)

    def attach(self, ctx: ProbeContext) -> None:
        self.hooks = HookSet(self.name, ctx.on_error)
        self.step_hooks = HookSet(self.name, ctx.on_error)
        self.setup(ctx)

    def arm(self, step: int) -> None:
        self.armed = True
        self.values = {}
        self.install(step)

    def collect(self, step: int, loss: Tensor | None) -> dict[str, Tensor]:
        self.release(step)
        self.armed = False
        out, self.values = self.values, {}
        out.update(self.compute(step, loss))
        return out

    def detach(self) -> None:
        self.armed = False
        self.step_hooks.remove()
        self.hooks.remove()


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
    """Warn with ``message`` unless ``key`` is already in ``seen`` (a probe's own set)."""
    if key not in seen:
        seen.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
