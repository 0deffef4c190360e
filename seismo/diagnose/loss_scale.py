"""Loss-scale drops under fp16 dynamic loss scaling: the detector of ``amp/loss_scale``.

With ``torch.amp.GradScaler`` a step whose scaled gradients overflow (inf/nan) is skipped and the
scale is multiplied by ``backoff_factor`` (0.5); after ``growth_interval`` clean steps it grows
again (dynamic loss scaling, Micikevicius et al. 2018, arXiv 1710.03740). One drop is routine.
Drops that come back within ``window`` steps mean the gradients keep overflowing fp16's range
(an instability upstream, or a model that needs bf16); a scale below ``critical_scale`` means
even unscaled gradients overflow.

The signal is recorded by the ``grad`` probe once the monitor knows the scaler
(:func:`seismo.monitor.gradients.use_grad_scaler`): the scale each step's backward ran with.
"""

from __future__ import annotations

import math
from typing import Mapping

from seismo.events import Event

__all__ = ["LossScaleDropDetector", "LOSS_SCALE_KIND", "LOSS_SCALE_SIGNAL"]

LOSS_SCALE_KIND = "loss_scale_drop"
LOSS_SCALE_SIGNAL = "amp/loss_scale"


class LossScaleDropDetector:
    """An event each time ``amp/loss_scale`` falls: ``info`` for an isolated drop, ``warning`` when
    it is the ``warn_drops``-th drop within ``window`` steps, ``critical`` below ``critical_scale``."""

    name = LOSS_SCALE_KIND

    def __init__(self, warn_drops: int = 3, window: int = 200, critical_scale: float = 1.0):
        if warn_drops < 1 or window < 1 or not critical_scale > 0:
            raise ValueError(f"need warn_drops >= 1, window >= 1, critical_scale > 0; got {warn_drops}, {window}, {critical_scale}")
        self.warn_drops, self.window, self.critical_scale = warn_drops, window, critical_scale
        self._last: float | None = None
        self._drops: list[int] = []

    def update(self, step: int, values: Mapping[str, float]) -> list[Event]:
        scale = values.get(LOSS_SCALE_SIGNAL)
        if scale is None or not math.isfinite(scale):
            return []
        last, self._last = self._last, scale
        if last is None or scale >= last:
            return []
        self._drops = [s for s in self._drops if s > step - self.window] + [step]
        n = len(self._drops)
        if scale < self.critical_scale:
            severity = "critical"
        elif n >= self.warn_drops:
            severity = "warning"
        else:
            severity = "info"
        message = (f"fp16 loss scale fell from {last:g} to {scale:g} (the scaler skipped a step with inf/nan gradients); "
                   f"{n} drop(s) in the last {self.window} steps")
        return [Event(LOSS_SCALE_KIND, severity, step, "", message,
                      evidence={"scale_before": last, "scale": scale, "drops_in_window": n, "window": self.window})]

    def state_dict(self) -> dict:
        return {"last": self._last, "drops": list(self._drops)}

    def load_state_dict(self, state: dict) -> None:
        self._last = state["last"]
        self._drops = list(state["drops"])
