"""Sweep presets reproducing the seed papers at CPU scale: ``fn(quick: bool) -> SweepConfig``.

Full variants run every cell (intervention, size, LR) over three seeds, so that an effect can be
told from seed noise; they take from about 10 (``edge_of_stability``) to about 100 trial-minutes
(``qk_layernorm``) on this project's 2-core machine. ``quick`` variants (one seed, 40 steps) take
<= 2 minutes (tests, smoke checks). Sizes scale width, depth and heads together at a fixed head
width of 16, as in Wortsman et al. 2023 (arXiv 2309.14322).
"""

from __future__ import annotations

from typing import Callable

from seismo.errors import ConfigError
from seismo.proxy.sweep import SweepConfig

__all__ = ["SWEEP_PRESETS", "get_sweep_preset", "SIZES"]

SIZES: dict[str, list[str]] = {
    "xxs": ["model.n_embd=16", "model.n_layer=1", "model.n_head=1"],
    "xs": ["model.n_embd=32", "model.n_layer=1", "model.n_head=2"],
    "s": ["model.n_embd=64", "model.n_layer=2", "model.n_head=4"],
    "m": ["model.n_embd=96", "model.n_layer=3", "model.n_head=6"],
    "l": ["model.n_embd=128", "model.n_layer=4", "model.n_head=8"],
}
FULL_LRS = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
QUICK_LRS = [1e-3, 1e-2, 1e-1]
FULL_SEEDS = [0, 1, 2]
QUICK_SEEDS = [0]
# A shorter, smaller training run than the demo so that a grid fits the time budget.
FULL_RUN = ["steps=300", "batch_size=16", "model.block_size=64", "optim.warmup_steps=30", "eval_every=0", "eval_batches=4",
            "data.max_bytes=2000000", "log_every=25"]
QUICK_RUN = ["steps=40", "batch_size=8", "model.block_size=32", "optim.warmup_steps=5", "eval_every=0", "eval_batches=2",
             "data.max_bytes=300000", "log_every=20"]


def _grid(name: str, quick: bool, interventions: dict[str, list[str]], description: str, extra: list[str] | None = None,
          sizes: tuple[str, ...] = ("xs", "s", "m")) -> SweepConfig:
    quick_sizes = tuple(k for k in sizes if k != "xxs")[:2]
    return SweepConfig(
        name=name + ("-quick" if quick else ""),
        base="baseline",
        lrs=QUICK_LRS if quick else FULL_LRS,
        sizes={k: SIZES[k] for k in (quick_sizes if quick else sizes)},
        seeds=list(QUICK_SEEDS if quick else FULL_SEEDS),
        interventions=interventions,
        overrides=(QUICK_RUN if quick else FULL_RUN) + (extra or []),
        description=description,
    )


def qk_layernorm(quick: bool = False) -> SweepConfig:
    """Baseline vs qk-layernorm: LR sensitivity and max attention logit (Wortsman 2023 §3.1, arXiv
    2309.14322). Four sizes, so that the size trend of the three smaller ones can be fitted and
    tested on the held-out largest (``--predict m``)."""
    return _grid("qk_layernorm", quick, {"baseline": [], "qk_norm": ["model.qk_norm=true"]}, qk_layernorm.__doc__,
                 sizes=("xxs", "xs", "s", "m"))


def qk_clip(quick: bool = False) -> SweepConfig:
    """QK-Clip at tau = 100 (MuonClip, Kimi Team 2025, "Kimi K2", arXiv 2507.20534, section 2.1)
    next to the baseline and qk-layernorm: LR sensitivity and max attention logit. The grid and run
    settings are :func:`qk_layernorm`'s, so its baseline and qk-norm trials are the same configs
    (the same trial keys) and can stand for this preset's."""
    return _grid("qk_clip", quick, {"baseline": [], "qk_norm": ["model.qk_norm=true"], "qk_clip": ["qk_clip=100"]},
                 qk_clip.__doc__, sizes=("xxs", "xs", "s", "m"))


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
    spike-free AdamW; betas (0.9, 0.999) as in the SPAM papers (Huang et al. 2025, arXiv 2501.06842;
    Stable-SPAM, arXiv 2502.17055).

    SPAM and Stable-SPAM run with the papers' eps 1e-6. Their momentum reset intervals (500 and
    1000 steps) are longer than a 300-step run, so they are scaled by 1/5 to 100 and 200 steps
    (SPAM's post-reset warm-up with them, 150 -> 30): the resets fire at steps 100 and 200 (SPAM)
    and 200 (Stable-SPAM), between the spikes. The quick variant scales them to 10 and 20 steps."""
    steps = [25, 26, 30, 35] if quick else [75, 76, 150, 225]  # SPAM clips from step 20 on (N_a)
    spam_reset, stable_reset = (10, 20) if quick else (100, 200)
    spikes = [f"spikes.steps={steps}", "spikes.factor=1000"]
    return _grid("spam", quick, {
        "adamw_clean": [],
        "adamw": spikes,
        "spam": spikes + ["optim.name=spam", "optim.eps=1e-6", f"optim.spam_reset_interval={spam_reset}"],
        "stable_spam": spikes + ["optim.name=stable_spam", "optim.eps=1e-6", f"optim.spam_reset_interval={stable_reset}"],
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
        seeds=list(QUICK_SEEDS if quick else FULL_SEEDS),
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
        seeds=list(QUICK_SEEDS if quick else FULL_SEEDS),
        interventions={"gd": []},
        overrides=["steps=300", "curvature_every=10", "eval_every=100", "log_every=50"] if quick else ["steps=3000", "curvature_every=10"],
        description=edge_of_stability.__doc__,
    )


SWEEP_PRESETS: dict[str, Callable[[bool], SweepConfig]] = {
    "qk_layernorm": qk_layernorm,
    "qk_clip": qk_clip,
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
