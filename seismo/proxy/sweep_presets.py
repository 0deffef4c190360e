"""Sweep presets reproducing the seed papers at CPU scale: ``fn(quick: bool) -> SweepConfig``.

Full variants are sized for <= 20 minutes on 2 cores with the local backend; ``quick`` variants
for <= 2 minutes (tests, smoke checks). Sizes scale width, depth and heads together, as in
Wortsman et al. 2023 (arXiv 2309.14322).
"""

from __future__ import annotations

from typing import Callable

from seismo.errors import ConfigError
from seismo.proxy.sweep import SweepConfig

__all__ = ["SWEEP_PRESETS", "get_sweep_preset", "SIZES"]

SIZES: dict[str, list[str]] = {
    "xs": ["model.n_embd=32", "model.n_layer=1", "model.n_head=2"],
    "s": ["model.n_embd=64", "model.n_layer=2", "model.n_head=4"],
    "m": ["model.n_embd=96", "model.n_layer=3", "model.n_head=6"],
    "l": ["model.n_embd=128", "model.n_layer=4", "model.n_head=8"],
}
FULL_LRS = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
QUICK_LRS = [1e-3, 1e-2, 1e-1]
# A shorter, smaller training run than the demo so that a grid fits the time budget.
FULL_RUN = ["steps=300", "batch_size=16", "model.block_size=64", "optim.warmup_steps=30", "eval_every=0", "eval_batches=4",
            "data.max_bytes=2000000", "log_every=25"]
QUICK_RUN = ["steps=40", "batch_size=8", "model.block_size=32", "optim.warmup_steps=5", "eval_every=0", "eval_batches=2",
             "data.max_bytes=300000", "log_every=20"]


def _grid(name: str, quick: bool, interventions: dict[str, list[str]], description: str, extra: list[str] | None = None,
          sizes: tuple[str, ...] = ("xs", "s", "m")) -> SweepConfig:
    return SweepConfig(
        name=name + ("-quick" if quick else ""),
        base="baseline",
        lrs=QUICK_LRS if quick else FULL_LRS,
        sizes={k: SIZES[k] for k in (sizes[:2] if quick else sizes)},
        interventions=interventions,
        overrides=(QUICK_RUN if quick else FULL_RUN) + (extra or []),
        description=description,
    )


def qk_layernorm(quick: bool = False) -> SweepConfig:
    """Baseline vs qk-layernorm: LR sensitivity and max attention logit (Wortsman 2023 §3.1)."""
    return _grid("qk_layernorm", quick, {"baseline": [], "qk_norm": ["model.qk_norm=true"]}, qk_layernorm.__doc__)


def z_loss(quick: bool = False) -> SweepConfig:
    """No weight decay, constant lr after warm-up: with and without z-loss 1e-4; log Z drift (§3.2)."""
    return _grid("z_loss", quick, {"baseline": [], "z_loss": ["z_loss=1e-4"]}, z_loss.__doc__,
                 extra=["optim.weight_decay=0", "optim.decay=constant", "model.qk_norm=true"])


def warmup(quick: bool = False) -> SweepConfig:
    """Short vs long warm-up: LR sensitivity (Wortsman 2023 §3.4.1; Gilmer 2022)."""
    long = "optim.warmup_steps=20" if quick else "optim.warmup_steps=100"
    return _grid("warmup", quick, {"warmup_short": ["optim.warmup_steps=1"], "warmup_long": [long]}, warmup.__doc__)


def independent_wd(quick: bool = False) -> SweepConfig:
    """Weight decay 1e-4 coupled to the lr (torch default) vs independent of it (§3.4.2)."""
    return _grid("independent_wd", quick, {"coupled": ["optim.weight_decay=1e-4"],
                                           "independent": ["optim.weight_decay=1e-4", "optim.independent_wd=true"]},
                 independent_wd.__doc__)


def mup(quick: bool = False) -> SweepConfig:
    """Standard parametrization vs muP (width multiplier over n_embd=32): optimal lr across sizes (§3.4.3)."""
    return _grid("mup", quick, {"standard": [], "mup": ["model.parametrization=mup", "model.mup_base_width=32"]}, mup.__doc__)


def sigma_reparam(quick: bool = False) -> SweepConfig:
    """Attention entropy at high lr: baseline vs sigmaReparam on every linear layer (Zhai 2023)."""
    return _grid("sigma_reparam", quick, {"baseline": [], "sigma_reparam": ["model.sigma_reparam=true"]}, sigma_reparam.__doc__)


def seqlen_warmup(quick: bool = False) -> SweepConfig:
    """Sequence-length warm-up (8 -> full over the lr warm-up) vs none (Li et al. 2022)."""
    return _grid("seqlen_warmup", quick, {"baseline": [], "seqlen_warmup": ["seqlen_warmup.enabled=true", "seqlen_warmup.start=8"]},
                 seqlen_warmup.__doc__)


def spam(quick: bool = False) -> SweepConfig:
    """x1000 gradient spikes on four steps: AdamW vs SPAM vs Stable-SPAM vs seismo.Guard, next to
    spike-free AdamW; betas (0.9, 0.999) as in the SPAM papers (Huang et al. 2025; Stable-SPAM 2025)."""
    steps = [25, 26, 30, 35] if quick else [75, 76, 150, 225]  # SPAM clips from step 20 on (N_a)
    spikes = [f"spikes.steps={steps}", "spikes.factor=1000"]
    return _grid("spam", quick, {
        "adamw_clean": [],
        "adamw": spikes,
        "spam": spikes + ["optim.name=spam"],
        "stable_spam": spikes + ["optim.name=stable_spam"],
        "guard_skip": spikes + ["guard=skip"],
    }, spam.__doc__, extra=["optim.beta2=0.999"], sizes=("xs", "s"))


def grokking(quick: bool = False) -> SweepConfig:
    """Modular addition without weight decay (Prieto et al. 2025): softmax (fp32, fp64) vs StableMax
    vs perpendicular gradients; test accuracy, grokking step and Softmax Collapse."""
    return SweepConfig(
        name="grokking" + ("-quick" if quick else ""),
        base="modular_mlp",
        lrs=[1e-2] if quick else [3e-3, 1e-2],
        sizes={"mlp64": ["hidden=[64, 64]"]} if quick else {"mlp200": []},
        interventions={"softmax": [], "softmax_fp64": ["dtype=float64"], "stablemax": ["output=stablemax"],
                       "perp_grad": ["perp_grad=true"]},
        overrides=["steps=150", "eval_every=25", "log_every=25"] if quick else ["steps=3000", "eval_every=50"],
        description=grokking.__doc__,
    )


def edge_of_stability(quick: bool = False) -> SweepConfig:
    """Full-batch GD on a small tanh MLP (Cohen et al. 2021; Gilmer et al. 2022): sharpness rises
    to 2/lr and hovers there; the ratio sharpness / (2/lr) over the second half of each run."""
    return SweepConfig(
        name="edge_of_stability" + ("-quick" if quick else ""),
        base="eos_mlp",
        lrs=[0.1, 0.2] if quick else [0.01, 0.02, 0.05, 0.1, 0.2],
        sizes={"w64": []} if quick else {"w32": ["hidden=[32, 32]"], "w64": []},
        interventions={"gd": []},
        overrides=["steps=300", "curvature_every=10", "eval_every=100", "log_every=50"] if quick else ["steps=3000", "curvature_every=10"],
        description=edge_of_stability.__doc__,
    )


SWEEP_PRESETS: dict[str, Callable[[bool], SweepConfig]] = {
    "qk_layernorm": qk_layernorm,
    "z_loss": z_loss,
    "warmup": warmup,
    "independent_wd": independent_wd,
    "mup": mup,
    "sigma_reparam": sigma_reparam,
    "seqlen_warmup": seqlen_warmup,
    "spam": spam,
    "grokking": grokking,
    "edge_of_stability": edge_of_stability,
}


def get_sweep_preset(name: str, quick: bool = False) -> SweepConfig:
    try:
        return SWEEP_PRESETS[name](quick)
    except KeyError:
        names = ", ".join(sorted(SWEEP_PRESETS))
        raise ConfigError(f"sweep: unknown preset {name!r}; choose one of {names} or give a .toml file") from None
