"""Outlier features (He et al. 2024, arXiv 2405.19279) and massive activations (Sun et al. 2024, arXiv 2402.17762)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seismo.monitor import Monitor
from seismo.monitor.outliers import OutlierProbe, outlier_stats
from seismo.proxy.model import GPTConfig, TinyGPT

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def numpy_reference(x: np.ndarray) -> tuple[float, float, int]:
    """Kurtosis of per-neuron RMS (He et al. eq. 1), max|x| / median|x| and the max's position, in float64 numpy."""
    b, t, d = x.shape
    flat = x.reshape(-1, d).astype(np.float64)
    s = np.sqrt((flat ** 2).mean(axis=0))
    kurt = (s ** 4).mean() / ((s ** 2).mean() ** 2)
    a = np.abs(flat)
    ratio = a.max() / np.median(a)
    pos = int(np.unravel_index(np.abs(x).argmax(), x.shape)[1])
    return kurt, ratio, pos


def test_stats_match_numpy_and_known_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 16, generator=g)
    x[1, 7, 4] = 500.0  # a massive activation at position 7
    x[:, :, 2] *= 30.0  # an outlier feature
    kurt, ratio, pos = outlier_stats(x)
    k_ref, r_ref, p_ref = numpy_reference(x.numpy())
    assert float(kurt) == pytest.approx(k_ref, rel=1e-5)
    # torch.median of an even count is the lower middle value, numpy's the mean of the two
    assert float(ratio) == pytest.approx(r_ref, rel=0.05)
    assert int(pos) == p_ref == 7
    same = torch.ones(5, 8, 6)  # every neuron the same scale: kurtosis exactly 1
    assert float(outlier_stats(same)[0]) == pytest.approx(1.0)
    one_hot = torch.zeros(2, 4, 8)  # one neuron carries everything: kurtosis = d
    one_hot[..., 3] = 1.0
    assert float(outlier_stats(one_hot)[0]) == pytest.approx(8.0)


def test_probe_on_tinygpt_finds_an_injected_massive_activation():
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16))
    blk = model.transformer.h[1]

    def inject(mod, inp, out):
        out = out.clone()
        out[:, 9, 5] += 1e4
        return out

    blk.register_forward_hook(inject)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = Monitor(model, opt, probes=[OutlierProbe()], flush_every=1)
    for s in range(3):
        idx = torch.randint(0, 32, (6, 16), generator=torch.Generator().manual_seed(s))
        _, loss = model(idx, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(loss)
    mon.close()
    h = mon.history
    assert set(h) == {f"outlier/{m}/transformer.h.{i}" for m in ("kurtosis", "massive_ratio", "massive_pos") for i in (0, 1)}
    assert h["outlier/massive_pos/transformer.h.1"][1] == [9.0] * 3
    assert min(h["outlier/massive_ratio/transformer.h.1"][1]) > 1e3
    assert max(h["outlier/massive_ratio/transformer.h.0"][1]) < 100  # the healthy block
    assert min(h["outlier/kurtosis/transformer.h.1"][1]) > 5 * max(h["outlier/kurtosis/transformer.h.0"][1])


def test_probe_ignores_eval_forwards_and_bad_blocks_disable_it():
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=8))
    probe = OutlierProbe(max_batch=1)
    mon = Monitor(model, None, probes=[probe], flush_every=1)
    with torch.no_grad():
        model(torch.zeros(2, 8, dtype=torch.long))
    assert probe.values == {}
    mon.close()
    with pytest.warns(RuntimeWarning, match="no module named 'nope'"):
        Monitor(model, None, probes=[OutlierProbe(blocks=["nope"])]).close()
    with pytest.raises(ValueError, match="max_batch"):
        OutlierProbe(max_batch=0)
