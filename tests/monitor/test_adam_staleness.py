"""Adam preconditioner staleness (g^2 < v_hat / 100) against a hand-simulated second moment."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from seismo.monitor import Monitor
from seismo.monitor.adam_staleness import AdamStalenessProbe
from seismo.monitor.tracking import every

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_stale_fraction_matches_a_hand_simulated_v_after_a_spike():
    """A linear layer whose gradients we set by hand: a spike on some coordinates, then small gradients."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 5, bias=False)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-3, betas=(0.9, 0.99))
    probe = AdamStalenessProbe(schedule=every(1))
    mon = Monitor(lin, opt, probes=[probe], flush_every=1)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(5, 4, generator=g) for _ in range(12)]
    grads[3][:2] *= 1000.0  # rows 0-1 spike once: their v stays inflated
    v = torch.zeros(5, 4, dtype=torch.float64)
    expected = []
    for t, gr in enumerate(grads, start=1):
        lin.weight.grad = gr.clone()
        opt.step()
        mon.step(torch.tensor(1.0))
        v = 0.99 * v + 0.01 * gr.double() ** 2
        v_hat = v / (1 - 0.99 ** t)
        expected.append(float(((gr.double() ** 2) * 100 < v_hat).double().mean()))
    mon.close()
    steps, got = mon.history["adam/stale_frac/<root>"]
    assert got == pytest.approx(expected, abs=1e-6)
    assert mon.history["adam/stale_frac"][1] == pytest.approx(expected, abs=1e-6)
    assert min(got[4:]) >= 0.4  # the two spiked rows (8 of 20 coordinates) stay stale after the spike
    assert max(got[:3]) < 0.4


def test_sgd_disables_the_probe_with_one_warning():
    lin = nn.Linear(2, 2)
    with pytest.warns(RuntimeWarning, match="staleness probe is off"):
        Monitor(lin, torch.optim.SGD(lin.parameters(), lr=0.1), probes=[AdamStalenessProbe()]).close()
    with pytest.raises(ValueError, match="ratio"):
        AdamStalenessProbe(ratio=1.0)
