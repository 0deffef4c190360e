"""What an optimizer says about curvature: Adam's preconditioner and the stability thresholds.

The sharpness a run can sustain depends on the optimizer: ``2 / lr`` for gradient descent and
``(2 + 2 beta) / lr`` with heavy-ball momentum (Cohen et al. 2021, arXiv:2103.00065);
``(2 + 2 beta1) / ((1 - beta1) lr)`` for Adam, compared with the sharpness of the preconditioned
Hessian ``P^{-1} H`` (Cohen et al. 2022, arXiv:2207.14484). The Hessian side (Lanczos,
Hutchinson, ``sharpness``) is in :mod:`seismo.monitor.curvature`.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor

from seismo.monitor.adam import adam_second_moment, adam_step_count, bias_corrections

__all__ = ["adam_preconditioner", "has_stability_threshold", "stability_threshold"]


def _default_dtype_for(device: torch.device) -> torch.dtype:
    # MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def adam_preconditioner(
    optimizer: torch.optim.Optimizer, params: Iterable[Tensor]
) -> Tensor | None:
    """Flat diagonal Adam preconditioner ``P = (1 - beta1^t) * (sqrt(v_hat) + eps)``.

    Cohen et al. 2022 (arXiv:2207.14484, "Adaptive Gradient Methods at the
    Edge of Stability") write Adam as preconditioned EMA momentum,
    ``theta_{t+1} = theta_t - lr * P_t^{-1} m_t`` with the *raw* first moment
    ``m_t = beta1 m_{t-1} + (1 - beta1) g_t``; since the update is
    ``lr * m_hat / (sqrt(v_hat) + eps)`` with ``m_hat = m / (1 - beta1^t)``,
    ``P_t = (1 - beta1^t) diag(sqrt(v_hat) + eps)``.  The eigenvalues of
    ``P^{-1} H`` (equal to those of ``P^{-1/2} H P^{-1/2}``) are then
    compared with ``(2 + 2 beta1) / ((1 - beta1) lr)``
    (:func:`stability_threshold`).  The ``1 - beta1^t`` factor matters early
    in training (0.65 at t = 10, 0.99 at t = 44 with beta1 = 0.9).

    ``v_hat = v / (1 - beta2^t)`` with ``v`` the second moment the update
    divides by (``max_exp_avg_sq`` with ``amsgrad=True``, else
    ``exp_avg_sq``); ``beta1``, ``beta2`` and ``eps`` come from the
    parameter's own param group; ``t`` from the parameter's state
    (``torch.optim``) or else its param group (pytorch-optimizer's SPAM,
    Stable-SPAM, LAMB, ...).  Optimizers that keep the moments of a boolean
    ``mask`` of coordinates only, flattened (SPAM with ``density < 1``), get
    ``P = +inf`` outside the mask.  The denominator mirrors
    ``torch.optim.Adam`` (``sqrt(v) / sqrt(1 - beta2^t) + eps``); for other
    optimizers it is the Adam-form preconditioner of their moments, not
    necessarily their exact update (SPAM scales eps by
    ``1 / sqrt(1 - beta2^t)``, NAdam mixes in the gradient).  The optimizer
    state is only read.

    Returns:
        A flat tensor (order of ``params``, dtype/device of the first
        parameter), or ``None`` if the optimizer has no state for any of
        ``params`` yet (before the first step).  Parameters the optimizer
        manages but has never updated (no state, e.g. never received a
        gradient) get ``P = +inf``, which removes them from the
        preconditioned operator -- Adam does not move them.

    Raises:
        ValueError: a parameter is not managed by ``optimizer``, its state
            lacks ``exp_avg_sq``, or the optimizer keeps no ``step`` count.
    """
    params = list(params)
    if not params:
        raise ValueError("adam_preconditioner: `params` is empty")
    group_of: dict[int, dict] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            group_of[id(p)] = group

    out_dtype = params[0].dtype
    out_device = params[0].device
    pieces: list[Tensor] = []
    any_state = False
    for i, p in enumerate(params):
        group = group_of.get(id(p))
        if group is None:
            raise ValueError(
                f"adam_preconditioner: params[{i}] (shape {tuple(p.shape)}) is not in any "
                "param group of the optimizer"
            )
        state = optimizer.state.get(p)
        if not state:
            pieces.append(torch.full((p.numel(),), math.inf, dtype=out_dtype, device=out_device))
            continue
        if "betas" not in group or "eps" not in group:
            raise ValueError(
                "adam_preconditioner: param group lacks 'betas'/'eps' "
                f"(optimizer {type(optimizer).__name__} is not Adam-like)"
            )
        if "exp_avg_sq" not in state:
            raise ValueError(
                f"adam_preconditioner: optimizer state of params[{i}] has no 'exp_avg_sq' "
                f"(optimizer {type(optimizer).__name__} is not Adam-like)"
            )
        step = adam_step_count(state, group)
        if step is None:
            raise ValueError(
                f"adam_preconditioner: {type(optimizer).__name__} keeps no 'step' count in the state "
                f"of params[{i}] or its param group (optimizer is not Adam-like)"
            )
        any_state = True
        with torch.no_grad():
            v = adam_second_moment(state, group).detach()
            beta1, beta2 = (float(b) for b in group["betas"])
            bc1, bc2 = bias_corrections(step, beta1, beta2)
            # torch.optim.Adam's denominator sqrt(v) / sqrt(bc2) + eps, times bc1 (Cohen et al. 2022)
            v = v.to(_default_dtype_for(v.device))  # float64 (float32 on MPS)
            denom = (v.sqrt() / bc2**0.5 + float(group["eps"])) * bc1
            denom = denom.reshape(-1).to(device=out_device, dtype=out_dtype)
            mask = state.get("mask")
            if v.numel() != p.numel() or (isinstance(mask, Tensor) and v.shape != p.shape):
                if not (isinstance(mask, Tensor) and mask.dtype == torch.bool and mask.shape == p.shape):
                    raise ValueError(
                        f"adam_preconditioner: params[{i}] has {p.numel()} entries but its second moment "
                        f"{v.numel()} and no boolean 'mask' of the parameter's shape pairs them"
                    )
                full = torch.full((p.numel(),), math.inf, dtype=out_dtype, device=out_device)
                full[mask.reshape(-1).to(out_device)] = denom  # shape mismatch raises
                denom = full
            pieces.append(denom)
    if not any_state:
        return None
    return torch.cat(pieces)


def has_stability_threshold(optimizer: torch.optim.Optimizer) -> bool:
    """Whether :func:`stability_threshold` knows a derived threshold for ``optimizer``:
    ``torch.optim.SGD`` (GD, heavy ball, Nesterov) and ``torch.optim.Adam`` / ``AdamW``."""
    return isinstance(optimizer, (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW))


def stability_threshold(optimizer: torch.optim.Optimizer) -> float:
    """Sharpness above which the optimizer is unstable on a quadratic.

    Uses the first param group's hyper-parameters.  Only optimizers for
    which the threshold is derived have one:

    * ``torch.optim.SGD``, no momentum (gradient descent): ``2 / lr``
      (Cohen et al. 2021, arXiv:2103.00065).
    * SGD with heavy-ball momentum ``beta`` and ``dampening = 0`` (PyTorch
      form ``b = beta*b + g``, ``p -= lr*b``): ``(2 + 2*beta) / lr`` (Cohen
      et al. 2021).  With ``dampening = d`` the gradient enters scaled by
      ``1 - d``, i.e. the same iteration at learning rate ``lr * (1 - d)``:
      ``(2 + 2*beta) / (lr * (1 - d))``.
    * SGD with ``nesterov=True`` (PyTorch form ``b = beta*b + g``,
      ``p -= lr*(g + beta*b)``): the same quadratic-model analysis, not in
      the paper: linearising on a quadratic with curvature ``lambda`` gives
      the characteristic polynomial
      ``z^2 - (1 + beta - h(1 + beta)) z + beta(1 - h)`` with
      ``h = lr*lambda``, which has a root at ``z = -1`` when
      ``h = (2 + 2*beta) / (1 + 2*beta)``; the threshold is therefore
      ``(2 + 2*beta) / ((1 + 2*beta) * lr)``.
    * ``torch.optim.Adam`` / ``AdamW`` (amsgrad too): ``(2 + 2*beta1) /
      ((1 - beta1) * lr)`` (= ``38 / lr`` at ``beta1 = 0.9``), to be compared
      with the *preconditioned* sharpness, the top eigenvalue of ``P^{-1} H``
      with ``P`` from :func:`adam_preconditioner` (Cohen et al. 2022,
      arXiv:2207.14484).

    Other optimizers, including Adam-like ones with ``betas`` (NAdam, RAdam,
    LAMB, SPAM, Stable-SPAM, ...), have no threshold here: their update is
    not the preconditioned EMA momentum the Adam threshold is derived for
    (NAdam's Nesterov-style mix of the gradient, LAMB's layer-wise trust
    ratio, SPAM's post-reset LR warm-up and clipping), so ``38 / lr`` would be
    a number without a derivation.

    Coupled L2 ``weight_decay`` in SGD adds ``weight_decay`` to the effective
    curvature; it is not folded in here (compare ``sharpness + weight_decay``
    if you use it).

    Raises:
        ValueError: an optimizer without a derived threshold, non-positive
            ``lr``, or a ``beta1 >= 1``.
    """
    if not optimizer.param_groups:
        raise ValueError("stability_threshold: optimizer has no param groups")
    if not has_stability_threshold(optimizer):
        raise ValueError(
            f"stability_threshold: no stability threshold is derived for {type(optimizer).__name__}; "
            "there is one for torch.optim.SGD (GD, heavy ball, Nesterov) and torch.optim.Adam / AdamW"
        )
    group = optimizer.param_groups[0]
    lr = float(group["lr"])
    if not lr > 0.0:
        raise ValueError(f"stability_threshold: lr must be > 0, got {lr}")

    if isinstance(optimizer, torch.optim.SGD):
        beta = float(group.get("momentum", 0.0) or 0.0)
        if beta == 0.0:
            return 2.0 / lr
        if group.get("nesterov", False):
            return (2.0 + 2.0 * beta) / ((1.0 + 2.0 * beta) * lr)
        dampening = float(group.get("dampening", 0.0) or 0.0)
        if dampening >= 1.0:
            return math.inf  # the momentum buffer never receives gradient
        return (2.0 + 2.0 * beta) / (lr * (1.0 - dampening))

    beta1 = float(group["betas"][0])
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"stability_threshold: beta1 must be in [0, 1), got {beta1}")
    return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)
