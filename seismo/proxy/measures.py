"""The measures of Wortsman et al. 2023 (arXiv 2309.14322): LR sensitivity, optimal LR,
divergence rate, and the size-scaling fits used to predict instability before it happens."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from seismo._stats import PowerLaw, fit_power_law

__all__ = [
    "lr_sensitivity", "optimal_lr", "divergence_rate", "PowerLaw", "fit_power_law", "predict_unstable_lrs",
    "first_step_at_or_above", "sharpness_ratio", "trial_measures",
]


def _capped(losses: Sequence[float], init_loss: float) -> np.ndarray:
    a = np.asarray(losses, dtype=np.float64)
    a = np.where(np.isfinite(a), a, init_loss)  # NaN / inf (diverged) count as the initial loss
    return np.minimum(a, init_loss)


def lr_sensitivity(losses: Sequence[float], init_loss: float) -> float:
    """E_eta[min(l(eta), l0)] - min_eta l(eta) over a (log-spaced) LR grid (Wortsman 2023 §2).

    ``losses`` are the final losses at each LR of the grid; non-finite ones are the initial loss
    ``l0``. The result is >= 0 and is 0 only if every LR reaches the best loss.
    """
    if len(losses) == 0:
        raise ValueError("lr_sensitivity needs at least one loss")
    if not math.isfinite(init_loss):
        raise ValueError(f"init_loss must be finite, got {init_loss}")
    c = _capped(losses, init_loss)
    return float(np.mean(c - c.min()))  # not c.mean() - c.min(): rounding made that -4e-16 for equal losses


def optimal_lr(lrs: Sequence[float], losses: Sequence[float], init_loss: float = math.inf) -> float:
    """The LR with the lowest (capped) final loss."""
    c = _capped(losses, init_loss if math.isfinite(init_loss) else np.inf)
    return float(np.asarray(lrs)[int(np.argmin(c))])


def divergence_rate(statuses: Sequence[str]) -> float:
    return float(np.mean([s == "diverged" for s in statuses])) if statuses else math.nan


def predict_unstable_lrs(
    table: dict[float, dict[float, float]], target_size: float, threshold: float
) -> dict[float, tuple[float, bool]]:
    """Wortsman §3.1.2 / §6: per LR, fit max attention logit vs model size (``table[lr][size] =
    logit``) and extrapolate to ``target_size``. Returns ``{lr: (predicted logit, unstable)}``,
    unstable meaning the prediction reaches ``threshold``."""
    out = {}
    for lr, by_size in sorted(table.items()):
        sizes = sorted(s for s in by_size if s < target_size)
        try:
            fit = fit_power_law(sizes, [by_size[s] for s in sizes])
        except ValueError:
            continue
        pred = float(fit(target_size))
        out[lr] = (pred, pred >= threshold)
    return out


def first_step_at_or_above(steps: Sequence[int], values: Sequence[float], level: float) -> int | None:
    """The first step whose value is >= ``level`` (None if never): e.g. when test accuracy reaches 95%."""
    for s, v in zip(steps, values):
        if math.isfinite(v) and v >= level:
            return int(s)
    return None


def sharpness_ratio(eig: Sequence[float], threshold: Sequence[float], tail: float = 0.5) -> tuple[float, float]:
    """(median, max) of top Hessian eigenvalue / stability threshold over the last ``tail`` of the
    probes. At the edge of stability (Cohen et al. 2021, arXiv 2103.00065) the median sits near 1:
    full-batch GD raises sharpness until it reaches 2/lr and then stays there."""
    e, t = np.asarray(eig, dtype=np.float64), np.asarray(threshold, dtype=np.float64)
    r = e / t
    r = r[np.isfinite(r)]
    if not len(r):
        return math.nan, math.nan
    last = r[int(len(r) * (1.0 - tail)):] if len(r) > 1 else r
    return float(np.median(last)), float(r.max())


def trial_measures(history: dict, grok_level: float = 0.95) -> dict[str, float | int | None]:
    """Per-trial measures beyond the loss, from a run's recorded signals (only those recorded):

    * ``final_val_acc`` and ``grok_step`` (first step with validation accuracy >= ``grok_level``),
      for classification runs (Prieto et al. 2025);
    * ``max_softmax_collapse`` (largest fraction of collapsed softmax rows, Prieto et al. 2025);
    * ``sharpness_ratio`` / ``max_sharpness_ratio``: top Hessian eigenvalue over its stability
      threshold (2/lr for GD), median over the second half of the run and maximum (Cohen 2021).
    """
    out: dict[str, float | int | None] = {}
    if "val/acc" in history:
        s, v = history["val/acc"]
        if len(v):
            out["final_val_acc"] = float(v[-1])
            out["grok_step"] = first_step_at_or_above(s, v, grok_level)
    if "train/acc" in history and len(history["train/acc"][1]):
        out["final_train_acc"] = float(history["train/acc"][1][-1])
    if "logits/softmax_collapse" in history:
        v = np.asarray(history["logits/softmax_collapse"][1], dtype=np.float64)
        out["max_softmax_collapse"] = float(np.nanmax(v)) if np.isfinite(v).any() else math.nan
    if "hessian/max_eig" in history and "hessian/threshold" in history:
        (s1, e), (s2, t) = history["hessian/max_eig"], history["hessian/threshold"]
        common, i1, i2 = np.intersect1d(s1, s2, return_indices=True)  # steps with both values
        if len(common):
            out["sharpness_ratio"], out["max_sharpness_ratio"] = sharpness_ratio(np.asarray(e)[i1], np.asarray(t)[i2])
    return out
