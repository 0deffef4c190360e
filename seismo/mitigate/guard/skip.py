"""How a step is skipped without a host synchronisation.

The decision is a 0-d device tensor. Zeroing the gradients is *not* a skip: Adam would still
advance its moments and step counter and apply weight decay. The Guard works with unchanged
``torch.optim`` optimizers, so it uses one of (``GuardConfig.skip_mode``):

* ``"fused"`` (optimizers built with ``fused=True``: Adam, AdamW, SGD). The decision is handed
  to the fused kernel as ``found_inf``, the channel ``GradScaler`` uses: the kernel leaves the
  parameters and moments untouched and the step counter is decremented back. Cost: none.
* ``"mask"`` (any optimizer whose state tensors live on the parameters' device and are updated
  in place). Before ``optimizer.step()`` the parameters and state tensors are copied into
  preallocated buffers (``torch._foreach_copy_``); afterwards every tensor is set to
  ``torch.where(skip, saved, new)``, which is exact (a NaN update cannot leak through, unlike
  an arithmetic blend). Cost: one extra copy of parameters + optimizer state in memory (for
  Adam 3x the parameter bytes) and about three extra passes over that memory per step.
* ``"sync"``: read the decision on the host and call ``optimizer.step()`` only when applying.
  No extra memory; one host sync per step. On a CPU that "sync" is a memory read, so it is the
  cheapest choice there.

``"auto"`` picks ``fused`` when the optimizer is fused, ``sync`` on CPU and ``mask`` otherwise,
and falls back to ``sync`` with a warning when ``mask`` cannot be exact (e.g. AdamW's step
counters stay on the CPU unless it is built with ``capturable=True`` or ``fused=True``). A step
whose optimizer state does not exist yet (the first one) is always decided on the host.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from seismo.errors import ConfigError

__all__ = ["SkipStepper", "supports_fused_skip"]


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (a view: writing into it writes the DTensor); a plain tensor as it is.
    DTensor has no sharding rule for ``_foreach_copy_``, and ``where`` with the plain 0-d decision
    would mix a Tensor with DTensors; every rank applies the same decision, so per shard is exact."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def supports_fused_skip(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` takes a ``found_inf`` decision (a fused torch optimizer)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and bool(optimizer.defaults.get("fused"))


class SkipStepper:
    """Steps ``optimizer`` or leaves everything as it was, following a 0-d bool device tensor.

    ``lr_factor()`` scales every group's LR for the step only; ``warn_once(key, message)`` reports
    the one-time fallback from ``mask`` to ``sync``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, mode: str, lr_factor: Callable[[], float],
                 warn_once: Callable[[str, str], None]):
        if mode == "fused" and not supports_fused_skip(optimizer):
            raise ConfigError("GuardConfig.skip_mode: 'fused' needs a torch optimizer built with fused=True "
                              "(Adam, AdamW, SGD); use 'mask' or 'sync'")
        self.optimizer = optimizer
        self.requested = mode
        self.mode: str | None = None if mode == "auto" else mode
        self._lr_factor = lr_factor
        self._warn_once = warn_once
        self._mask: dict | str | None = None
        self._state_ready = False

    def reset(self) -> None:
        """Forget the mask buffers and the state check (after the optimizer state was replaced)."""
        self._mask = None
        self._state_ready = False

    def apply(self, skip: Tensor, with_grad: list[Tensor], n_params: int, device: torch.device) -> bool:
        """Step unless ``skip``. Returns True when the decision was read on the host and was a skip
        (the caller then does its bookkeeping at once)."""
        if self.mode is None:
            self.mode = "fused" if supports_fused_skip(self.optimizer) else ("sync" if device.type == "cpu" else "mask")
        if self.mode == "sync" or not self._state_initialised(with_grad, n_params):
            if bool(skip):
                return True
            self.optimizer_step()
            return False
        if self.mode == "fused":
            self.optimizer.found_inf = skip.to(torch.float32)
            try:
                self.optimizer_step()
            finally:
                del self.optimizer.found_inf
            return False
        return self._mask_step(skip, device)

    def optimizer_step(self) -> None:
        """``optimizer.step()`` with each group's LR times the rollback LR factor (restored after)."""
        f = self._lr_factor()
        if f == 1.0:
            self.optimizer.step()
            return
        groups = self.optimizer.param_groups
        base = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = g["lr"] * f
        try:
            self.optimizer.step()
        finally:
            for g, lr in zip(groups, base):
                g["lr"] = lr

    def _state_initialised(self, with_grad: list[Tensor], n_params: int) -> bool:
        """Whether every parameter about to be stepped already has optimizer state (the lazy
        first-step initialisation cannot be undone without the decision on the host)."""
        if self._state_ready:
            return True
        state = self.optimizer.state
        if len(state) >= n_params:
            self._state_ready = True
            return True
        return all(p in state and len(state[p]) > 0 for p in with_grad)

    def _build_mask(self, device: torch.device) -> dict | str:
        live: list[Tensor] = []
        state = self.optimizer.state
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                st = state.get(p)
                if not st:
                    continue
                live.append(_local(p))
                for k, v in st.items():
                    if not isinstance(v, Tensor):
                        return f"optimizer state {k!r} is a {type(v).__name__}, not a tensor"
                    live.append(_local(v))
        for x in live:
            if x.device != device:
                return (f"a parameter or optimizer state tensor is on {x.device}, the decision on {device}; "
                        "for AdamW build it with capturable=True or fused=True")
        return {"live": live, "saved": [torch.empty_like(x) for x in live], "n_state": len(state)}

    def _mask_step(self, skip: Tensor, device: torch.device) -> bool:
        """Snapshot, step, select. Returns True if it fell back to the host and saw a skip."""
        m = self._mask
        if isinstance(m, dict) and m["n_state"] != len(self.optimizer.state):
            m = None
        if m is None:
            m = self._mask = self._build_mask(device)
        if isinstance(m, str):
            self._warn_once("mask", f"seismo Guard: skip_mode 'mask' cannot be exact here ({m}); "
                                    "deciding skips on the host instead (one sync per step)")
            self.mode = "sync"
            if bool(skip):
                return True
            self.optimizer_step()
            return False
        torch._foreach_copy_(m["saved"], m["live"])
        self.optimizer_step()
        for x, s in zip(m["live"], m["saved"]):
            torch.where(skip, s, x, out=x)
        return False
