"""The playbook, as data: for each event kind, ranked mitigations with the paper behind them.

Each :class:`Mitigation` names a concrete call (``call``) that exists in seismo (a test imports
every one of them) or a plain configuration change, and the evidence for it (``paper``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Mitigation", "PLAYBOOK", "mitigations_for", "CAUSES", "PRIORITY"]


@dataclass(frozen=True)
class Mitigation:
    name: str
    how: str  # what to change, in one sentence
    call: str  # the seismo symbol that implements it ("" for a plain setting)
    paper: str

    def advice(self) -> str:
        return f"{self.name}: {self.how}" + (f" (`{self.call}`)" if self.call else "") + f" [{self.paper}]"


WORTSMAN = "Wortsman et al. 2023, arXiv 2309.14322"
ZHAI = "Zhai et al. 2023, arXiv 2303.06296"
PRIETO = "Prieto et al. 2025, arXiv 2501.04697"
PALM = "Chowdhery et al. 2022 (PaLM), arXiv 2204.02311"
MOLYBOG = "Molybog et al. 2023, arXiv 2304.09871"
GILMER = "Gilmer et al. 2022, arXiv 2110.04369"
LI = "Li, Zhang & He 2022, arXiv 2108.06084"
PERILN = "Kim et al. 2025 (Peri-LN), arXiv 2502.02732"
SWIN = "Liu et al. 2022 (Swin V2), arXiv 2111.09883"

QKNORM = Mitigation("qk-layernorm", "LayerNorm on queries and keys per head before the dot product",
                    "seismo.mitigate.QKNorm", WORTSMAN + "; Dehghani et al. 2023, arXiv 2302.05442")
SIGMA = Mitigation("sigmaReparam", "reparametrize every linear layer as gamma / sigma(W) * W",
                   "seismo.mitigate.apply_sigma_reparam", ZHAI)
COSINE = Mitigation("scaled cosine attention", "bound attention logits by a learnable per-head scale (<= 100)",
                    "seismo.mitigate.ScaledCosineAttention", SWIN)
LOWER_LR = Mitigation("lower the learning rate", "divide the peak learning rate by 2-4", "", WORTSMAN)
WARMUP = Mitigation("longer warm-up", "lengthen the linear lr warm-up (e.g. 5% of training)",
                    "seismo.mitigate.schedules.warmup_cosine", GILMER + "; " + WORTSMAN)
ZLOSS = Mitigation("z-loss", "add 1e-4 * (log Z)^2 to the loss", "seismo.mitigate.z_loss", PALM + "; " + WORTSMAN)
WD = Mitigation("weight decay", "use (independent) weight decay, e.g. lambda = 1e-4 with weight_decay = lambda / lr",
                "seismo.mitigate.param_groups.independent_weight_decay", WORTSMAN)
CLIP = Mitigation("gradient clipping", "clip the global gradient norm (e.g. at 1.0)", "torch.nn.utils.clip_grad_norm_", WORTSMAN)
ROLLBACK = Mitigation("roll back and skip data", "restart from a checkpoint ~100 steps before the spike and skip 200-500 batches",
                      "seismo.Guard", PALM)
SMALL_EPS = Mitigation("smaller Adam eps", "lower AdamW eps to 1e-15 so updates keep their size when gradients are tiny", "", WORTSMAN)
SLW = Mitigation("sequence-length warm-up", "start training on short sequences and grow them (DeepSpeed rule)",
                 "seismo.mitigate.schedules.seqlen_warmup", LI)
STABLEMAX = Mitigation("StableMax", "replace softmax in the loss with StableMax", "seismo.mitigate.stablemax_cross_entropy", PRIETO)
PERIGRAD = Mitigation("perpendicular gradients", "remove the gradient component along the weights (the naive-loss-minimisation direction)",
                      "seismo.mitigate.transforms.orthogonalize", PRIETO)
FP64 = Mitigation("higher softmax precision", "compute the output softmax / loss in float64", "", PRIETO)
PERI = Mitigation("Peri-LN", "normalise each branch's input and output (not the residual stream)", "seismo.mitigate.PeriLNResidual", PERILN)
RESPOST = Mitigation("residual post-norm", "LayerNorm on each residual branch's output", "seismo.mitigate.ResPostNormResidual", SWIN)
SKIP = Mitigation("skip spiking steps", "let seismo.Guard skip steps whose loss or gradient spikes or is non-finite",
                  "seismo.Guard", PALM + "; OLMo-core SkipStepOptimizer")
SPAM_OPT = Mitigation("SPAM / Stable-SPAM", "spike-aware clipping with momentum reset", "seismo.mitigate.optimizers.spam",
                      "Huang et al. 2025, arXiv 2501.06842; arXiv 2502.17055")
SMALL_BATCH = Mitigation("smaller batch", "use a smaller batch (noisier, less time-correlated gradients)", "", MOLYBOG)
CHECK_DATA = Mitigation("check the batch", "look for corrupt or extreme samples in the offending batches", "", PALM)
RAISE_LR = Mitigation("check the schedule",
                      "the learning rate or the update size may have decayed to nothing; raise it or shorten the decay", "", WORTSMAN)

RESET_MOMENTS = Mitigation("reset Adam's moments", "zero exp_avg / exp_avg_sq once (with a short lr warm-up after it)",
                          "seismo.mitigate.optimizers.reset_moments", "Huang et al. 2025 (SPAM), arXiv 2501.06842")
LOWER_BETA2 = Mitigation("lower beta2", "use beta2 = 0.95 so the second moment forgets a spike in ~20 steps instead of ~1000",
                         "", "arXiv 2506.04805; " + WORTSMAN)
ADAGC = Mitigation("AdaGC", "clip each tensor's gradient to 1.05x its running norm, so spikes never enter v",
                   "seismo.mitigate.transforms.adagc", "Wang et al. 2025, arXiv 2502.11034")

BF16 = Mitigation("bf16 instead of fp16", "train under torch.autocast(dtype=torch.bfloat16): fp32's exponent range, no loss scale "
                  "to overflow", "", "Kalamkar et al. 2019, arXiv 1905.12322; Micikevicius et al. 2018, arXiv 1710.03740")

PLAYBOOK: dict[str, list[Mitigation]] = {
    "attention_logit_growth": [QKNORM, SIGMA, LOWER_LR, COSINE, WARMUP],
    "attention_entropy_collapse": [SIGMA, QKNORM, LOWER_LR, WARMUP],
    "output_logit_divergence": [ZLOSS, WD, LOWER_LR],
    "loss_spike": [ROLLBACK, CLIP, LOWER_LR, WARMUP],
    "loss_divergence": [ROLLBACK, LOWER_LR, QKNORM, ZLOSS],
    "loss_regression": [LOWER_LR, WARMUP, CLIP, CHECK_DATA],
    "grad_spike": [CLIP, SPAM_OPT, SKIP, ROLLBACK, LOWER_LR],
    "update_spike": [CLIP, LOWER_LR, SPAM_OPT, SKIP],
    "nonfinite": [SKIP, ROLLBACK, LOWER_LR, CHECK_DATA],
    "edge_of_stability": [WARMUP, LOWER_LR],
    "adam_decorrelation": [LOWER_LR, SMALL_EPS, SMALL_BATCH, ROLLBACK],
    "epsilon_regime": [SMALL_EPS],
    "softmax_collapse": [STABLEMAX, PERIGRAD, WD, FP64],
    "gradient_variance_extreme": [SLW, CLIP, LOWER_LR],
    "activation_growth": [PERI, RESPOST, LOWER_LR],
    "stall": [RAISE_LR, SMALL_EPS],
    "preconditioner_staleness": [RESET_MOMENTS, LOWER_BETA2, ADAGC],
    "loss_scale_drop": [BF16, CLIP, LOWER_LR],
}

#: A plain-language cause per kind, used by ``seismo diagnose``.
CAUSES: dict[str, str] = {
    "attention_logit_growth": "attention logits grew without bound, so softmax attention saturated to one-hot (Wortsman 2023 §3.1)",
    "attention_entropy_collapse": "attention entropy collapsed: each query attends to a single key (Zhai 2023)",
    "output_logit_divergence": "the output logits drifted so far that log Z left the stable range (Wortsman 2023 §3.2)",
    "loss_spike": "the loss spiked",
    "loss_divergence": "the loss left its baseline and did not come back",
    "loss_regression": "the loss climbed above its own recent level and stayed there for a while "
                       "(a slow instability, or a hard stretch of data)",
    "grad_spike": "the gradient norm spiked",
    "update_spike": "the size of the optimizer update spiked (Adam update spikes come before loss spikes; Molybog 2023, arXiv 2304.09871)",
    "nonfinite": "NaN/Inf appeared in the loss or gradients",
    "edge_of_stability": "the loss sharpness exceeded what the learning rate tolerates (Cohen 2021; Gilmer 2022)",
    "adam_decorrelation": "Adam's update decorrelated from the gradient (time-correlated gradients; Molybog 2023)",
    "epsilon_regime": "gradients shrank to Adam's eps scale, so updates shrink (Wortsman 2023 §3.5)",
    "softmax_collapse": "the output softmax collapsed numerically: losses and gradients of confident rows are exactly 0 (Prieto 2025)",
    "gradient_variance_extreme": "Adam's gradient-variance estimate hit an extreme value (Li 2022)",
    "activation_growth": "residual-stream activations grew by orders of magnitude (massive activations)",
    "stall": "training stalled: the loss is flat while the updates vanished",
    "preconditioner_staleness": "Adam's second moment still holds old large gradients, so current updates are damped (arXiv 2506.04805)",
    "loss_scale_drop": "fp16 gradients overflowed, so the GradScaler skipped the step and halved the loss scale (arXiv 1710.03740)",
}

#: Root-cause priority when several kinds fire: upstream mechanisms first, symptoms last.
PRIORITY = [
    "attention_logit_growth", "attention_entropy_collapse", "output_logit_divergence", "softmax_collapse",
    "adam_decorrelation", "epsilon_regime", "preconditioner_staleness", "edge_of_stability", "gradient_variance_extreme",
    "activation_growth",
    "update_spike", "grad_spike", "loss_scale_drop", "nonfinite", "loss_divergence", "loss_regression", "loss_spike", "stall",
]


def mitigations_for(kind: str) -> list[Mitigation]:
    return list(PLAYBOOK.get(kind, []))
