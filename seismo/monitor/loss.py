"""Loss probe: ``loss`` and ``loss/spike_score``."""

from __future__ import annotations

import torch
from torch import Tensor

from seismo.monitor.probe import HookedProbe
from seismo.monitor.tracking import Schedule

__all__ = ["LossProbe"]


class LossProbe(HookedProbe):
    """Records the loss and a device-side spike score.

    ``loss/spike_score`` = (loss - m) / s, where m and s are an exponential moving mean and
    standard deviation of the *previous* tracked losses (time constant ``1/alpha`` steps). The
    score of a value is computed before it enters the averages, and values scoring above
    ``clip_score`` enter them clipped, so one spike does not inflate the baseline for what follows.
    All state is on the loss's device: no host synchronisation.
    """

    def __init__(
        self, name: str = "loss", schedule: Schedule | None = None, alpha: float = 0.02, warmup: int = 10, clip_score: float = 6.0
    ):
        super().__init__(name, schedule)
        self.alpha = alpha
        self.warmup = warmup
        self.clip_score = clip_score
        self.mean: Tensor | None = None
        self.var: Tensor | None = None
        self.count = 0

    def compute(self, step: int, loss: Tensor | None) -> dict[str, Tensor]:
        if loss is None:
            return {}
        x = loss.detach().float().reshape(())
        if self.mean is None:
            self.mean = x.clone()
            self.var = torch.zeros_like(x)
        std = self.var.sqrt()
        score = torch.where(std > 0, (x - self.mean) / std.clamp_min(1e-12), torch.zeros_like(x))
        if self.count < self.warmup:
            score = torch.zeros_like(score)
        # Keep spikes (and non-finite values) out of the baseline.
        finite = torch.isfinite(x)
        cap = self.mean + self.clip_score * std
        x_cl = x if self.count < self.warmup else torch.minimum(x, cap)
        x_in = torch.where(finite, x_cl, self.mean)
        a = self.alpha if self.count >= self.warmup else 1.0 / (self.count + 1)
        delta = x_in - self.mean
        self.mean = self.mean + a * delta
        self.var = (1 - a) * (self.var + a * delta * delta)
        self.count += 1
        return {"loss": x, "loss/spike_score": score}

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], int(state["count"])
