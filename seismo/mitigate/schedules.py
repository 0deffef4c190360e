"""Learning-rate and sequence-length schedules as pure functions of the step.

Every function here is ``f(step, ...) -> value`` with no state, so it gives the same answer
after a checkpoint resume and can drive any training loop (set ``group["lr"]`` yourself, or
wrap it with :func:`lr_lambda` for ``torch.optim.lr_scheduler.LambdaLR``).

* Linear warm-up + cosine decay: the schedule of Wortsman et al. 2023 (arXiv 2309.14322) and
  nanoGPT; warm-up as a stabilizer: Gilmer et al. 2022 (arXiv 2110.04369).
* Sequence-length warm-up: Li, Zhang & He 2022 (arXiv 2108.06084), DeepSpeed's
  ``fixed_linear`` / ``fixed_root`` curriculum rule.
"""

from __future__ import annotations

import math
from typing import Callable

__all__ = ["warmup_cosine", "warmup_linear", "warmup_constant", "lr_at", "seqlen_warmup", "lr_lambda"]


def _check(step: int, peak_lr: float, warmup_steps: int, total_steps: int) -> None:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if peak_lr < 0:
        raise ValueError(f"peak lr must be >= 0, got {peak_lr}")
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}")


def _warmup(step: int, peak_lr: float, warmup_steps: int) -> float:
    # Step 0 gets peak/warmup (not 0) so the very first update already moves the weights.
    return peak_lr * (step + 1) / warmup_steps


def warmup_cosine(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warm-up to ``peak_lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``total_steps``."""
    _check(step, peak_lr, warmup_steps, total_steps)
    if step < warmup_steps:
        return _warmup(step, peak_lr, warmup_steps)
    if step >= total_steps:
        return min_lr
    frac = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (peak_lr - min_lr)


def warmup_linear(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warm-up, then linear decay to ``min_lr`` at ``total_steps``."""
    _check(step, peak_lr, warmup_steps, total_steps)
    if step < warmup_steps:
        return _warmup(step, peak_lr, warmup_steps)
    if step >= total_steps:
        return min_lr
    frac = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr + frac * (min_lr - peak_lr)


def warmup_constant(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warm-up, then constant ``peak_lr`` (``min_lr`` is ignored)."""
    _check(step, peak_lr, warmup_steps, total_steps)
    return _warmup(step, peak_lr, warmup_steps) if step < warmup_steps else peak_lr


_DECAYS: dict[str, Callable[..., float]] = {
    "cosine": warmup_cosine,
    "linear": warmup_linear,
    "constant": warmup_constant,
}


def lr_at(step: int, peak_lr: float, warmup_steps: int, total_steps: int, decay: str = "cosine", min_lr: float = 0.0) -> float:
    """Dispatch by name: ``decay`` is one of ``cosine``, ``linear``, ``constant``."""
    try:
        fn = _DECAYS[decay]
    except KeyError:
        raise ValueError(f"unknown decay {decay!r}; choose one of {sorted(_DECAYS)}") from None
    return fn(step, peak_lr, warmup_steps, total_steps, min_lr)


def lr_lambda(peak_lr: float, warmup_steps: int, total_steps: int, decay: str = "cosine", min_lr: float = 0.0) -> Callable[[int], float]:
    """A multiplier function for ``torch.optim.lr_scheduler.LambdaLR`` (optimizer lr = ``peak_lr``)."""
    if peak_lr <= 0:
        raise ValueError("lr_lambda needs peak_lr > 0")
    return lambda step: lr_at(step, peak_lr, warmup_steps, total_steps, decay, min_lr) / peak_lr


def seqlen_warmup(step: int, min_len: int, max_len: int, total_steps: int, multiple: int = 8, root: float = 1.0) -> int:
    """Sequence length at ``step`` under DeepSpeed's curriculum rule (Li et al. 2022).

    ``d = floor((step / total_steps) ** (1 / root) * (max_len - min_len) + min_len)``, rounded down
    to a multiple of ``multiple``, never below ``multiple`` or above ``max_len``. ``root=1`` is
    ``fixed_linear``; ``root=2`` is ``fixed_root`` with degree 2. Truncate each batch to
    ``tokens[:, :d]``. Example: 8 -> 1024 over 15000 steps gives 512 at step 7500.
    """
    if not (0 < min_len <= max_len):
        raise ValueError(f"need 0 < min_len <= max_len, got {min_len}, {max_len}")
    if total_steps < 1 or multiple < 1 or root <= 0:
        raise ValueError("need total_steps >= 1, multiple >= 1, root > 0")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    frac = min(1.0, step / total_steps) ** (1.0 / root)
    d = math.floor(frac * (max_len - min_len) + min_len)
    d -= d % multiple
    return max(min(d, max_len), min(multiple, max_len))
