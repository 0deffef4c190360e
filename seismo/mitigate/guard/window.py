"""The Guard's spike detector: median / MAD over the last accepted values, on the device."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from seismo._stats import MAD_TO_SIGMA
from seismo.mitigate.guard.config import GuardConfig

__all__ = ["REASONS", "SpikeWindow"]

#: Why a step was skipped, in the order of the flag vector :meth:`SpikeWindow.decide` returns.
REASONS = ("nonfinite_loss", "nonfinite_grad", "loss_spike", "grad_spike")


class SpikeWindow:
    """Median / MAD over the last ``window`` accepted (loss, grad norm) pairs, on the device.

    The robust z-score rule of OLMo-core and llm.c, with flagged values kept out of the window
    (see :class:`GuardConfig`). ``decide`` and ``accept`` are pure tensor code: no ``.item()``, no
    Python branch on data. Unfilled slots hold NaN and are ignored by ``nanmedian`` (the lower
    median for even counts).
    """

    def __init__(self, cfg: GuardConfig):
        self.size = cfg.window
        self.warmup = cfg.warmup
        self.z = cfg.z
        self.min_jump = (cfg.loss_min_jump, cfg.grad_min_jump)
        self.active = (cfg.watch_loss, cfg.watch_grad_norm)
        self.buf: Tensor | None = None
        self.count: Tensor | None = None
        self._consts: tuple[torch.device, Tensor, Tensor] | None = None

    def _ensure(self, device: torch.device) -> None:
        if self.buf is None:
            self.buf = torch.full((2, self.size), float("nan"), device=device)
            self.count = torch.zeros((), dtype=torch.long, device=device)
        elif self.buf.device != device:
            self.buf, self.count = self.buf.to(device), self.count.to(device)
        if self._consts is None or self._consts[0] != device:
            self._consts = (device, torch.tensor(self.min_jump, device=device), torch.tensor(self.active, device=device))

    def decide(self, vals: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``vals`` = (loss, grad norm), float32. Returns the flags (4,) float32 in REASONS order,
        the window medians (2,) and the robust z-scores (2,)."""
        self._ensure(vals.device)
        _, min_jump, active = self._consts
        med = torch.nanmedian(self.buf, dim=1).values
        mad = torch.nanmedian((self.buf - med[:, None]).abs(), dim=1).values
        scale = torch.maximum(MAD_TO_SIGMA * mad, 1e-3 * med.abs()).clamp_min(1e-12)
        dev = vals - med
        z = dev / scale
        spike = (self.count >= self.warmup) & active & (z > self.z) & (dev > min_jump * med.abs())
        flags = torch.cat([~torch.isfinite(vals), spike]).float()
        return flags, med, z

    def accept(self, ok: Tensor, vals: Tensor) -> None:
        """Append ``vals`` to the window where ``ok`` (a 0-d bool tensor); otherwise leave it."""
        pos = torch.remainder(self.count, self.size).reshape(1)
        cur = self.buf.index_select(1, pos).squeeze(1)
        self.buf.index_copy_(1, pos, torch.where(ok, vals, cur).unsqueeze(1))
        self.count += ok.long()

    def reset(self) -> None:
        """Forget every value (warm-up starts again)."""
        if self.buf is not None:
            self.buf.fill_(float("nan"))
            self.count.zero_()

    def state_dict(self) -> dict | None:
        if self.buf is None:
            return None
        return {"buf": self.buf.detach().to("cpu", copy=True), "count": self.count.detach().to("cpu", copy=True)}

    def load_state_dict(self, state: Mapping | None) -> None:
        if state is None:
            self.buf = self.count = None
            return
        if tuple(state["buf"].shape) != (2, self.size):
            raise ValueError(f"Guard window state has shape {tuple(state['buf'].shape)}, expected (2, {self.size})")
        device = self.buf.device if self.buf is not None else torch.device("cpu")
        self.buf = state["buf"].to(device, copy=True)
        self.count = state["count"].to(device, copy=True).long()
