"""The spike rules systems use today, re-implemented from their projects' rules as baselines.

Each rule is a streaming object: ``update(value) -> bool`` says whether it raises an alarm at this
step (what its system would act on: skip the step, log, or raise). Written from the rule as
PEERS.md states it; the source file of each rule in its project is cited. No code is copied.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

__all__ = ["OlmoSpikeRule", "FoundryKillLossSpike", "LightningSpikeDetection", "PEER_RULES"]


class OlmoSpikeRule:
    """OLMo-core ``SkipStepOptimizer`` (allenai/OLMo-core ``src/olmo_core/optim/skip_step_optimizer.py``;
    used by ``src/olmo_core/optim/adamw.py``): alarm when ``value - mean > sigma * std`` over the
    last ``window`` values, the history excluding the current value; inactive until ``min_values``
    values have been seen (counting the current one).

    Its flaw is kept on purpose: every value, spikes included, is appended to the history, so a
    spike inflates the std for the next ``window`` steps. The source compares ``|z|`` (two-sided:
    a sudden *drop* is skipped too), which is what is implemented; the std is the sample std
    (n - 1). The same rule is applied to the loss and, for grad-norm series, to the pre-clip grad
    norm. It only skips the step: the right response to an isolated outlier.
    """

    name = "olmo_core"

    def __init__(self, window: int = 128, sigma: float = 6.0, min_values: int = 64):
        self.sigma, self.min_values = sigma, min_values
        self.history: deque[float] = deque(maxlen=window + 1)  # previous `window` values + the current one

    def update(self, x: float) -> bool:
        self.history.append(x)  # appended whatever the verdict (the flaw PEERS.md notes)
        if len(self.history) < self.min_values:
            return False
        prev = np.fromiter(list(self.history)[:-1], dtype=np.float64)
        mean, std = prev.mean(), prev.std(ddof=1)
        if not math.isfinite(x):
            return True
        return bool(abs(x - mean) > self.sigma * std)


class FoundryKillLossSpike:
    """llm-foundry ``KillLossSpike`` (mosaicml/llm-foundry
    ``llmfoundry/callbacks/kill_loss_spike_callback.py``): an outlier is ``loss >= multiplier x`` the
    mean of the rolling window; a spike is more than ``patience`` (4) consecutive outliers, i.e. the
    alarm is raised at the 5th consecutive outlier and on every further one. The window is
    ``max(100, 5% of training)`` values and the rule is active once the window is full; every
    loss (outliers included) enters the window. The "high loss" divergence check (half the window
    above a cap) is a different event and is not scored here. A kill switch by design: it stops
    a run whose loss has at least doubled for five steps, not a detector of mild instabilities.
    """

    name = "llm_foundry"

    def __init__(self, total_steps: int, multiplier: float = 2.0, patience: int = 4):
        self.window: deque[float] = deque(maxlen=max(100, int(0.05 * total_steps)))
        self.multiplier, self.patience = multiplier, patience
        self.outliers = 0

    def update(self, x: float) -> bool:
        alarm = False
        if len(self.window) == self.window.maxlen:
            if x >= self.multiplier * float(np.mean(self.window)):
                self.outliers += 1
                alarm = self.outliers > self.patience
            else:
                self.outliers = 0
        self.window.append(x)
        return alarm


class LightningSpikeDetection:
    """Lightning ``SpikeDetection`` (Lightning-AI/pytorch-lightning
    ``src/lightning/fabric/utilities/spike.py``), as PEERS.md states it: "spike if not an improvement
    and abs(loss - mean) >= 2.0 x mean of the last 10; non-finite counts".

    Read literally: ``mean`` is the running mean of the last ``window`` (10) accepted losses;
    "not an improvement" means the loss is not below the previous accepted loss; the spike test is
    ``|loss - mean| >= rtol * |mean|`` with rtol 2.0, so for a positive loss it fires when the loss
    is at least 3x the running mean. Spikes do not enter the mean (Lightning raises on a spike; here
    the run goes on and every such step is an alarm). Warm-up: the first value is never a spike.
    A kill switch by design (it raises to stop training), for catastrophic spikes only.
    """

    name = "lightning"

    def __init__(self, window: int = 10, rtol: float = 2.0, warmup: int = 1):
        self.values: deque[float] = deque(maxlen=window)
        self.rtol, self.warmup = rtol, warmup
        self.last = 0.0
        self.seen = 0

    def update(self, x: float) -> bool:
        idx = self.seen
        self.seen += 1
        if not math.isfinite(x):
            return idx >= self.warmup
        spike = False
        if idx >= self.warmup and self.values:
            mean = float(np.mean(self.values))
            better = x - self.last <= 0.0
            spike = (not better) and abs(x - mean) >= self.rtol * abs(mean)
        if not spike:
            self.values.append(x)
            self.last = x
        return spike


def PEER_RULES(signal: str, total_steps: int) -> list:
    """Fresh instances of the peer rules that apply to ``signal`` (loss: all three; grad norm:
    OLMo-core's, the only one of the three that watches it)."""
    if signal == "loss":
        return [OlmoSpikeRule(), FoundryKillLossSpike(total_steps), LightningSpikeDetection()]
    return [OlmoSpikeRule()]
