"""The demo's promise, checked on the demo's own runs (600 steps each: slow)."""

import numpy as np
import pytest
import torch

from seismo.diagnose import diagnose_history
from seismo.proxy.presets import demo_stable, demo_unstable
from seismo.proxy.train import train


def degradation_step(unstable: np.ndarray, stable: np.ndarray, rel: float = 0.05, smooth: int = 20) -> int:
    """First step after which the unstable run's smoothed loss stays >= 5% above the stable run's."""
    k = np.ones(smooth) / smooth
    u, s = np.convolve(unstable, k, mode="valid"), np.convolve(stable, k, mode="valid")
    worse = u >= (1 + rel) * s
    for i in range(len(worse)):
        if worse[i:].all():
            return i + smooth - 1
    return len(unstable)


@pytest.mark.slow
def test_demo_unstable_run_is_warned_early_and_stable_run_is_quiet():
    torch.set_num_threads(2)
    ru, rs = train(demo_unstable()), train(demo_stable())
    warn = [e for e in ru.events if e.kind == "attention_logit_growth" and e.severity == "warning"]
    assert warn, "no early warning on the unstable run"
    onset = degradation_step(ru.train_loss, rs.train_loss)
    assert warn[0].step < onset
    assert not [e for e in rs.events if e.kind.startswith("attention")]
    d = diagnose_history(ru.history, "unstable")
    assert d.cause_kind == "attention_logit_growth"
    assert d.recommendations[0]["name"] == "qk-layernorm"
    print(f"first warning at step {warn[0].step}, loss degradation from step {onset}: lead {onset - warn[0].step} steps")
