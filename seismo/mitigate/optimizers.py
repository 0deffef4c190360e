"""Spike-aware and related optimizers from ``pytorch-optimizer``, built with the papers' defaults.

``pip install 'seismo[optim]'`` installs pytorch-optimizer (kozistr/pytorch_optimizer); it is
imported only when a factory is called. Each factory returns the library's optimizer (a plain
``torch.optim.Optimizer``) with the defaults of the paper or its official code, listed in
:data:`PAPER_DEFAULTS`; keyword arguments override them, and unknown names raise ``TypeError``
(the library would silently keep them as group options). Checked against pytorch-optimizer 4.1.0.

* :func:`spam`: SPAM, Huang et al. 2025 (ICLR; arXiv 2501.06842; TianjinYellow/SPAM-Optimizer).
* :func:`stable_spam`: Stable-SPAM (arXiv 2502.17055; TianjinYellow/StableSPAM).
* :func:`adabelief`: AdaBelief, Zhuang et al. 2020 (NeurIPS; arXiv 2010.07468).
* :func:`adamp`: AdamP, Heo et al. 2021 (ICLR; arXiv 2006.08217).
* :func:`diffgrad`: diffGrad, Dubey et al. 2019 (arXiv 1909.11015).
* :func:`lamb`: LAMB, You et al. 2020 (ICLR; arXiv 1904.00962).
* :func:`orthograd`: perp-Grad wrapper, Prieto et al. 2025 (arXiv 2501.04697); see also
  :func:`seismo.mitigate.transforms.orthogonalize`.
* :func:`reset_moments`: zero the moment buffers of any optimizer after a spike.
* :func:`adam_atan2` / :class:`AdamAtan2`: Adam-atan2, Everett et al. 2024 (arXiv 2407.05872),
  seismo's own implementation (pytorch-optimizer has none): no epsilon.

Deviations from the papers / official code, and what seismo does about them
(tests in tests/mitigate/test_optimizers.py check each against a hand-written reference):

SPAM
    * The library's default post-reset warm-up is 50 steps; the official class default (and the
      README) is 150: seismo sets ``warmup_epoch=150``. The official *run scripts* passed the LR
      warm-up (1000) instead, so the published runs used a 1000-step post-reset warm-up.
    * **Corrected:** the library's warm-up multiplier is shifted by one step (at c steps after a
      reset it returns the official value for c + 1: 0.01011 instead of 0.01000 at c = 0). With
      ``exact_warmup=True`` (default) seismo replaces the library's ``CosineDecay`` by the official
      closed form ``s(c) = 1 - 0.99 (1 + cos(pi c / (N + 1))) / 2`` for c < N, 1 afterwards
      (0.01000, 0.01011, 0.01043 at c = 0, 1, 2 for N = 150), through a step pre-hook on the
      instance (the class stays ``pytorch_optimizer.SPAM``). Until the first reset the library and
      the official code agree.
    * Kept: with ``density < 1`` the library masks every 2-D parameter (official: only groups that
      set ``density``); equivalent at the default density 1.
    * Kept: the library draws from the global torch RNG when it is built and at every momentum reset
      (mask sampling, even at density 1), so adding SPAM shifts the random stream (dropout, data
      order) of the rest of the run compared with Adam.
    * Property of SPAM itself (official code too): a coordinate whose gradient was exactly 0 during
      the 20 steps after a reset (e.g. an embedding row not seen yet) keeps v = 0, so every later
      gradient on it is "a spike" clipped to 0 until the next reset: it does not learn for up to
      ``update_proj_gap`` steps. :func:`seismo.mitigate.transforms.clip_per_coordinate` avoids this.

Stable-SPAM (defaults = the official class defaults; the README's BF16 recipe uses gamma1 0.85,
gamma2 0.99999)
    * Kept: at a momentum reset the library zeroes m and v *before* that step's update; the official
      code keeps using the old moments for that one step.
    * Kept: the AdaClip / AdaGN bias corrections use the global step (``1 - theta**total_step``); the
      official code uses the per-parameter step that restarts at each reset (which inflates the
      clip threshold ~500x right after a reset with theta = 0.999). Both are identical before the
      first reset; they differ afterwards (by ~2e-3 at lr 1e-3 in a toy run).
    * Kept: a parameter whose gradient is exactly 0 gets no Adam update that step (decay still applies).

AdaBelief: ``eps=1e-16`` and decoupled decay (the official package's defaults) and
``rectify=False`` (the paper's Algorithm 2; the official package defaults to rectification).
The update matches the paper: ``s = beta2 s + (1 - beta2)(g - m)^2 + eps`` after updating m.

AdamP: the library adds eps to ``sqrt(v)`` before the bias correction
(``m sqrt(1 - beta2^t) / (sqrt(v) + eps)``, i.e. eps is scaled by ``1 / sqrt(1 - beta2^t)``; official:
``sqrt(v) / sqrt(1 - beta2^t) + eps``). Kept: negligible unless ``|g| < ~1e-6``.

diffGrad: the library uses ``sqrt(v + 1e-15) + eps`` in the denominator. Kept: negligible.

LAMB (``weight_decouple=False`` puts ``lambda w`` inside the trust ratio as in the paper)
    * **Corrected:** the library multiplies the trust-ratio-normalised step by ``1 / (1 - beta1^t)``
      (10x the paper's step at t = 1 with beta1 = 0.9); seismo sets the library's
      ``adam_debias=True`` so the step is ``lr * phi(||w||) * u / ||u||`` as in the paper.
    * Kept: the library's ``u = m / (sqrt(v) + eps) + lambda w`` uses the raw moments, the paper's
      ``r = m_hat / (sqrt(v_hat) + eps)`` the bias-corrected ones. With ``weight_decay=0`` this only
      moves eps (the direction is normalised away); with ``weight_decay > 0`` the decay term weighs
      ``sqrt(1 - beta2^t) / (1 - beta1^t)`` times more than in the paper (~0.3x at t = 100 with
      beta2 = 0.999), for the first few thousand steps.
    * Kept: ``phi(z) = min(z, 10)`` and a trust ratio of 1 if ``||w||`` or ``||u||`` is 0; eps in the
      trust-ratio denominator.
"""

from __future__ import annotations

import inspect
import math
import types
from typing import Any, Iterable

import torch

__all__ = [
    "PAPER_DEFAULTS", "MOMENT_KEYS", "spam", "stable_spam", "adabelief", "adamp", "diffgrad", "lamb",
    "orthograd", "reset_moments", "spam_warmup_multiplier", "spam_threshold_for_beta2", "AdamAtan2", "adam_atan2",
]

_ro = types.MappingProxyType

#: The defaults each factory passes to the library (pytorch-optimizer argument names).
PAPER_DEFAULTS: types.MappingProxyType = _ro({
    # SPAM class defaults (galore_torch/SPAM.py): warmup 150, theta 5000, DeltaT 500, N_a 20, eps 1e-6
    "spam": _ro(dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, threshold=5000,
                     update_proj_gap=500, warmup_epoch=150, grad_accu_steps=20, density=1.0)),
    # Stable-SPAM class defaults (galore_torch/stablespam.py); gamma3 is called theta, total_T t_max
    "stable_spam": _ro(dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, gamma1=0.7, gamma2=0.9,
                            theta=0.999, t_max=None, eta_min=0.5, update_proj_gap=1000)),
    "adabelief": _ro(dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-16, weight_decay=0.0, weight_decouple=True,
                          rectify=False)),
    "adamp": _ro(dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, delta=0.1, wd_ratio=0.1,
                      nesterov=False)),
    "diffgrad": _ro(dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)),
    "lamb": _ro(dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, weight_decouple=False,
                     adam_debias=True)),
})

# pytorch-optimizer reads these from param-group options rather than constructor arguments.
_GROUP_OPTIONS = frozenset({"adam_debias", "adanorm", "adanorm_r", "cautious", "use_gc"})

#: State keys :func:`reset_moments` zeroes by default: first/second-moment and momentum buffers.
MOMENT_KEYS = frozenset({
    "exp_avg", "exp_avg_sq", "exp_avg_var", "max_exp_avg_sq", "max_exp_avg_var", "momentum_buffer", "momentum",
})


def _library():
    try:
        import pytorch_optimizer
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "seismo.mitigate.optimizers needs pytorch-optimizer: pip install 'seismo[optim]'"
        ) from e
    return pytorch_optimizer


def _build(which: str, cls_name: str, params, kw: dict[str, Any]) -> torch.optim.Optimizer:
    cls = getattr(_library(), cls_name)
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "params", "kwargs"}
    unknown = set(kw) - allowed - _GROUP_OPTIONS
    if unknown:
        raise TypeError(f"{which}() got unknown argument(s) {sorted(unknown)}; {cls_name} accepts {sorted(allowed)}")
    return cls(params, **{**PAPER_DEFAULTS[which], **kw})


def spam_warmup_multiplier(c: int, n: int = 150) -> float:
    """SPAM's post-reset LR multiplier c steps after a reset (official closed form), 1 for c >= n."""
    if c >= n:
        return 1.0
    return 1.0 - 0.99 * (1.0 + math.cos(math.pi * c / (n + 1))) / 2.0


class _SpamWarmup:
    """Stand-in for pytorch-optimizer's ``CosineDecay`` inside SPAM: the official closed form, stateless."""

    def __init__(self, n: int):
        self.t_max = n
        self.eta_min = 0.0

    def get_death_rate(self, current_step: int) -> float:
        return 1.0 - spam_warmup_multiplier(current_step, self.t_max)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def _install_exact_warmup(optimizer, args=None, kwargs=None) -> None:
    # SPAM builds a fresh CosineDecay at every reset; swap it before the step that reads it.
    if not isinstance(optimizer.warmup, _SpamWarmup):
        optimizer.warmup = _SpamWarmup(optimizer.warmup_epoch)


def spam_threshold_for_beta2(beta2: float, reference_beta2: float = 0.999, reference_threshold: float = 5000.0) -> float:
    """The SPAM threshold that inflates v as much at ``beta2`` as the paper's 5000 does at 0.999.

    A coordinate clipped to sqrt(theta v) turns v into beta2 v + (1 - beta2) theta v, i.e. multiplies
    it by ``beta2 + (1 - beta2) theta``: 6.0 with the paper's (0.999, 5000), 251 at beta2 = 0.95,
    which shrinks every later update ~16x until v decays again. Solving for the same factor gives
    101 at beta2 = 0.95 (measured in docs/BENCHMARKS.md, "Injected gradient spikes").
    """
    if not (0.0 <= beta2 < 1.0 and 0.0 <= reference_beta2 < 1.0):
        raise ValueError(f"betas must be in [0, 1), got {beta2} and {reference_beta2}")
    factor = reference_beta2 + (1.0 - reference_beta2) * reference_threshold
    return max(0.0, (factor - beta2) / (1.0 - beta2))


def spam(params, *, exact_warmup: bool = True, **kw) -> torch.optim.Optimizer:
    """SPAM: Adam with momentum reset every ``update_proj_gap`` steps, spike clipping, post-reset warm-up.

    Defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-6, threshold 5000, update_proj_gap (Delta T) 500,
    warmup_epoch (N) 150, grad_accu_steps (N_a) 20. ``exact_warmup`` corrects the library's one-step
    shift of the warm-up (module docstring). The threshold 5000 is calibrated for beta2 = 0.999;
    with a smaller beta2 use :func:`spam_threshold_for_beta2` (at beta2 = 0.95 the default made
    x1000 spikes *worse* than plain AdamW in our runs).
    """
    opt = _build("spam", "SPAM", params, kw)
    if exact_warmup:
        _install_exact_warmup(opt)
        opt.register_step_pre_hook(_install_exact_warmup)
    return opt


def stable_spam(params, **kw) -> torch.optim.Optimizer:
    """Stable-SPAM: AdaClip (spike clip to the EMA of max|g|), AdaGN (per-tensor norm rescaling), MoRet.

    Defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, gamma1 0.7, gamma2 0.9, theta (gamma3) 0.999,
    update_proj_gap 1000, t_max None (no cosine decay of beta1/gamma1).
    """
    return _build("stable_spam", "StableSPAM", params, kw)


def adabelief(params, **kw) -> torch.optim.Optimizer:
    """AdaBelief: Adam whose second moment tracks ``(g - m)^2``. Defaults: lr 1e-3, eps 1e-16, no rectify."""
    return _build("adabelief", "AdaBelief", params, kw)


def adamp(params, **kw) -> torch.optim.Optimizer:
    """AdamP: removes the radial part of the update for scale-invariant weights (delta 0.1, wd_ratio 0.1)."""
    return _build("adamp", "AdamP", params, kw)


def diffgrad(params, **kw) -> torch.optim.Optimizer:
    """diffGrad: Adam with friction ``sigmoid(|g_{t-1} - g_t|)`` on the first moment. Defaults: Adam's."""
    return _build("diffgrad", "DiffGrad", params, kw)


def lamb(params, **kw) -> torch.optim.Optimizer:
    """LAMB: layer-wise trust ratio ``min(||w||, 10) / ||r + lambda w||`` (paper's Algorithm 2).

    Defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-6, weight decay inside the trust ratio
    (``weight_decouple=False``), and the library's ``adam_debias=True`` (module docstring).
    """
    return _build("lamb", "Lamb", params, kw)


def orthograd(optimizer: torch.optim.Optimizer, **kw) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` in pytorch-optimizer's ``OrthoGrad`` (perp-Grad before every step).

    Same projection and norm restore as the paper (eps 1e-30); differs in one case: when
    ``||g_perp|| <= 4 * machine-eps * ||g||`` the gradient is set to 0 instead of amplifying rounding
    noise. The wrapper's ``state_dict`` is the inner optimizer's. To keep the optimizer unchanged,
    use ``attach(optimizer, transforms.orthogonalize())`` instead.
    """
    return _library().OrthoGrad(optimizer, **kw)


def reset_moments(optimizer: torch.optim.Optimizer, keys: Iterable[str] = MOMENT_KEYS) -> int:
    """Zero the moment buffers of ``optimizer`` in place (an intervention after a loss spike).

    Every floating-point state tensor whose key is in ``keys`` (default :data:`MOMENT_KEYS`:
    Adam/AdamW/SPAM ``exp_avg``/``exp_avg_sq``, AdaBelief ``exp_avg_var``, SGD ``momentum_buffer``,
    AMSGrad maxima) is zeroed; step counters and every other entry are kept. Returns the number of
    tensors zeroed. As in SPAM's momentum reset, the step counter is not reset, so Adam's bias
    correction is ~1 and its first update after a reset is ``(1 - beta1) / sqrt(1 - beta2)`` = 3.16
    times lr per coordinate for betas (0.9, 0.999) (SPAM, Huang et al. 2025, arXiv 2501.06842): pair it with a short LR
    warm-up, as SPAM does. Works on any optimizer with a ``state`` mapping (wrappers included).
    """
    keys = frozenset(keys)
    zeroed = 0
    with torch.no_grad():
        for state in optimizer.state.values():
            if not isinstance(state, dict):
                continue
            for k, v in state.items():
                if k in keys and isinstance(v, torch.Tensor) and v.is_floating_point():
                    v.zero_()
                    zeroed += 1
    return zeroed


class AdamAtan2(torch.optim.Optimizer):
    """Adam-atan2: Adam whose ``m_hat / (sqrt(v_hat) + eps)`` is replaced by ``a * atan2(m_hat, b * sqrt(v_hat))``.

    Everett et al. 2024, "Scaling Exponents Across Parameterizations and Optimizers" (arXiv 2407.05872,
    section 3.3, a = 1.27, b = 1): atan2 is bounded by pi/2 and behaves like ``m / (b sqrt(v))`` for
    small ratios, so there is no epsilon to tune, and a coordinate with ``v = 0`` (never seen a
    gradient) gets a bounded update instead of ``m / eps``. Per step, per coordinate, with decoupled
    weight decay as in AdamW::

        p <- p (1 - lr * weight_decay)
        m <- beta1 m + (1 - beta1) g;   v <- beta2 v + (1 - beta2) g^2
        p <- p - lr * a * atan2(m / (1 - beta1^t), b * sqrt(v / (1 - beta2^t)))
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                 a: float = 1.27, b: float = 1.0):
        if not lr >= 0 or not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0 or weight_decay < 0 or a <= 0 or b <= 0:
            raise ValueError(f"AdamAtan2: need lr >= 0, 0 <= betas < 1, weight_decay >= 0, a > 0, b > 0; got "
                             f"lr={lr}, betas={betas}, weight_decay={weight_decay}, a={a}, b={b}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, a=a, b=b))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd, a, b = group["lr"], group["weight_decay"], group["a"], group["b"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamAtan2 does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if wd:
                    p.mul_(1.0 - lr * wd)
                m.lerp_(p.grad, 1.0 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
                den = (v / (1.0 - beta2 ** t)).sqrt_().mul_(b)
                p.add_(torch.atan2(m / (1.0 - beta1 ** t), den), alpha=-lr * a)
        return loss


def adam_atan2(params, **kw) -> torch.optim.Optimizer:
    """Adam-atan2 (Everett et al. 2024, arXiv 2407.05872) with the paper's a = 1.27, b = 1; see :class:`AdamAtan2`."""
    return AdamAtan2(params, **kw)
