"""Stabilizers from the literature as drop-in parts. See docs/MITIGATE.md."""

from seismo.mitigate import optimizers, transforms
from seismo.mitigate.blocks import PeriLNResidual, ResPostNormResidual, ScaledCosineAttention
from seismo.mitigate.guard import Guard, GuardConfig, GuardGaveUp
from seismo.mitigate.losses import StableMax, stablemax, stablemax_cross_entropy, z_loss
from seismo.mitigate.model_edits import QKNorm, SigmaReparam, apply_sigma_reparam
from seismo.mitigate.param_groups import decay_groups, independent_weight_decay, mup_param_groups
from seismo.mitigate.qk_clip import QKClip
from seismo.mitigate.schedules import lr_at, seqlen_warmup, warmup_cosine, warmup_linear

__all__ = [
    "transforms", "optimizers", "Guard", "GuardConfig", "GuardGaveUp",
    "PeriLNResidual", "ResPostNormResidual", "ScaledCosineAttention",
    "QKClip", "z_loss", "StableMax", "stablemax", "stablemax_cross_entropy", "QKNorm", "SigmaReparam", "apply_sigma_reparam",
    "decay_groups", "independent_weight_decay", "mup_param_groups", "lr_at", "seqlen_warmup", "warmup_cosine", "warmup_linear",
]
