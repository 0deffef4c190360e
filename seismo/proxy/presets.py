"""Presets: plain Python functions that return a :class:`TrainConfig` (TinyGPT) or a
:class:`~seismo.proxy.fullbatch.FullBatchConfig` (full-batch MLP: ``modular_mlp``, ``eos_mlp``).

``seismo train --preset NAME --set key=value`` starts from one of these. Add your own by writing
a function; there is no string-to-import-path indirection to fail at run time.
"""

from __future__ import annotations

from typing import Callable

from seismo.errors import ConfigError
from seismo.proxy.fullbatch import FullBatchConfig
from seismo.proxy.train import TrainConfig

__all__ = ["PRESETS", "get_preset", "preset_names"]


def baseline() -> TrainConfig:
    """The demo model (d=128, 2 layers, 4 heads, T=128, B=32) at a healthy lr 1e-2, 600 steps."""
    cfg = TrainConfig(steps=600, batch_size=32)
    cfg.optim.lr = 1e-2
    cfg.optim.warmup_steps = 100
    return cfg


def demo_unstable() -> TrainConfig:
    """The demo's first run: the baseline at lr 0.1, ten times too high. Attention logits blow up."""
    cfg = baseline()
    cfg.optim.lr = 1e-1
    cfg.run_name = "demo-unstable"
    return cfg


def demo_stable() -> TrainConfig:
    """The demo's second run: the same lr 0.1 with qk-layernorm and z-loss 1e-4 (Wortsman 2023)."""
    cfg = demo_unstable()
    cfg.model.qk_norm = True
    cfg.z_loss = 1e-4
    cfg.run_name = "demo-qknorm-zloss"
    return cfg


def tiny() -> TrainConfig:
    """A seconds-long run for tests and smoke checks (d=64, 2 layers, T=64, B=8, 60 steps)."""
    cfg = TrainConfig(steps=60, batch_size=8, eval_every=30, eval_batches=2, log_every=10)
    cfg.model.n_embd = 64
    cfg.model.block_size = 64
    cfg.optim.warmup_steps = 10
    cfg.data.max_bytes = 400_000
    return cfg


def grokking() -> TrainConfig:
    """Modular addition mod 113, 40% train split, full batch, AdamW lr 1e-3, no weight decay
    (Prieto et al. 2025 setup on a 1-layer TinyGPT). Set model.output=stablemax to compare."""
    cfg = TrainConfig(steps=2000, batch_size=0, eval_every=100, eval_batches=1, log_every=50, seq_len=3)
    cfg.data.source = "modular"
    cfg.model.block_size = 3
    cfg.model.n_layer = 1
    cfg.optim.lr = 1e-3
    cfg.optim.beta2 = 0.99
    cfg.optim.warmup_steps = 10
    cfg.optim.decay = "constant"
    return cfg


def modular_mlp() -> FullBatchConfig:
    """Prieto et al. 2025 grokking MLP: (a + b) mod 113, 40% train, 226-200-200-113 ReLU without
    biases, full batch, AdamW lr 1e-2 (betas 0.9/0.99, eps 1e-25), no weight decay, fp32 softmax.
    Set output=stablemax or perp_grad=true for the two fixes."""
    return FullBatchConfig(task="modular", steps=3000, lr=1e-2, run_name="modular-mlp")


def eos_mlp() -> FullBatchConfig:
    """Edge of stability (Cohen et al. 2021): a 16-64-64-1 tanh MLP regressing a smooth target on
    256 points with full-batch GD lr 0.05; sharpness (every 10 steps) rises to 2/lr = 40 and stays."""
    return FullBatchConfig(task="regression", hidden=[64, 64], activation="tanh", bias=True, optimizer="sgd", lr=0.05,
                           steps=2000, eval_every=100, curvature_every=10, run_name="eos-mlp")


PRESETS: dict[str, Callable[[], TrainConfig | FullBatchConfig]] = {
    "baseline": baseline,
    "demo_unstable": demo_unstable,
    "demo_stable": demo_stable,
    "tiny": tiny,
    "grokking": grokking,
    "modular_mlp": modular_mlp,
    "eos_mlp": eos_mlp,
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> TrainConfig | FullBatchConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"preset: unknown preset {name!r}; choose one of {', '.join(preset_names())}") from None
