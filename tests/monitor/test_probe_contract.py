"""One contract over every built-in probe: on TinyGPT with AdamW, tracked every step, a probe
records 0-d float tensors under ``family/metric[/module]`` names and, once the Monitor is closed,
leaves nothing behind (no module, parameter or optimizer hook, no patched function). Also: the old
import paths still name the same objects."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from seismo.monitor import (
    ActivationProbe,
    AdamProbe,
    AttentionProbe,
    GradientProbe,
    HookedProbe,
    LogitsProbe,
    LossProbe,
    Monitor,
    Probe,
    UpdateProbe,
    every,
)
from seismo.monitor.curvature_probe import CurvatureProbe
from seismo.proxy.model import GPTConfig, TinyGPT

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAME = re.compile(r"^(loss|[a-z]+/[a-z][a-z0-9_]*(/[A-Za-z0-9_.\-]+)?)$")
V, T = 32, 16


def data(step):
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, V, (2, T), generator=g), torch.randint(0, V, (2, T), generator=g)


PROBES = {
    "loss": lambda px, py: LossProbe(schedule=every(1)),
    "grad": lambda px, py: GradientProbe(schedule=every(1)),
    "update": lambda px, py: UpdateProbe(schedule=every(1)),
    "adam": lambda px, py: AdamProbe(schedule=every(1)),
    "attn": lambda px, py: AttentionProbe(schedule=every(1)),
    "logits": lambda px, py: LogitsProbe(schedule=every(1)),
    "act": lambda px, py: ActivationProbe(schedule=every(1)),
    "hessian": lambda px, py: CurvatureProbe(lambda m: m(px, py)[1], schedule=every(1), iters=3),
}


FAMILIES = {"update": ("update", "param")}  # the update probe also reports the parameter norms it divides by


def hooks_left(model, opt) -> int:
    n = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    n += sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters())
    return n + len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)


@pytest.mark.parametrize("family", list(PROBES))
def test_every_probe_records_named_scalars_and_leaves_nothing_behind(family):
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=V, block_size=T, n_layer=2, n_head=2, n_embd=16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    px, py = data(99)
    probe = PROBES[family](px, py)
    assert isinstance(probe, HookedProbe) and isinstance(probe, Probe) and probe.name == family
    sdpa, softmax = F.scaled_dot_product_attention, F.softmax
    mon = Monitor(model, opt, probes=[probe], flush_every=1)
    records = []
    for step in range(2):
        _, loss = model(*data(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        records.append(mon.step(loss))
    mon.close()
    assert not mon.disabled
    for rec in records:
        assert rec, family
        for name, value in rec.items():
            assert NAME.match(name) and name.split("/")[0] in FAMILIES.get(family, (family,)), name
            assert isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point(), name
    assert hooks_left(model, opt) == 0
    assert F.scaled_dot_product_attention is sdpa and F.softmax is softmax


def test_old_import_paths_name_the_same_objects():
    import seismo.monitor.attention as attention
    import seismo.monitor.attention_sites as old_sites
    import seismo.monitor.schedules as old_schedules
    import seismo.monitor.tracking as tracking
    from seismo.monitor import MONITOR_PRESETS, PRESETS
    from seismo.proxy import model as proxy_model

    assert old_schedules.every is tracking.every and old_schedules.log_spaced is tracking.log_spaced
    for name in ("find_generic_sites", "MHASite", "SDPASite", "HFAttentionSite", "sdpa_logits", "mha_logits", "is_intercepting"):
        assert getattr(old_sites, name) is getattr(attention, name), name
    assert proxy_model.AttentionLogitTap is attention.AttentionLogitTap
    assert PRESETS is MONITOR_PRESETS
