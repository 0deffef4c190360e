"""Optimizer parameter groups: weight-decay masks, independent weight decay and muP learning rates.

* Independent weight decay (Wortsman et al. 2023, arXiv 2309.14322 §3.4; NanoDO's
  ``weight_decay = lambda / peak_lr``): PyTorch's AdamW multiplies its decay by the scheduled lr,
  so passing lambda / lr_peak makes the per-step decay (lr_t / lr_peak) * lambda, independent of
  the peak learning rate being swept.
* muP for Adam (Yang et al. 2022, arXiv 2203.03466, Table 3): hidden weight matrices get
  lr * base_width / width; embeddings, norms, biases and the readout keep the base lr (the
  readout is instead scaled by 1 / width_mult in the forward pass).

Each group carries an ``lr_scale`` key: a training loop sets ``group["lr"] = lr_t * group["lr_scale"]``.
"""

from __future__ import annotations

import torch.nn as nn

__all__ = ["independent_weight_decay", "decay_groups", "mup_param_groups"]


def independent_weight_decay(lam: float, peak_lr: float) -> float:
    """The ``weight_decay`` to give torch's AdamW so the decay does not scale with the peak lr."""
    if peak_lr <= 0:
        raise ValueError(f"independent weight decay needs a positive peak lr, got {peak_lr}")
    if lam < 0:
        raise ValueError(f"weight decay must be >= 0, got {lam}")
    return lam / peak_lr


def _embedding_param_ids(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices (dim >= 2) decay, vectors (norm gains, biases, scalars) do not."""
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0})
    return groups


def mup_param_groups(model: nn.Module, weight_decay: float, width_mult: float, readout: tuple[str, ...] = ("lm_head",)) -> list[dict]:
    """Groups with muP learning-rate scales: hidden matrices ``1/width_mult``, the rest 1.

    A hidden matrix is any parameter with dim >= 2 that is not an ``nn.Embedding`` weight and
    does not belong to a module named in ``readout``.
    """
    if width_mult <= 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult}")
    emb = _embedding_param_ids(model)
    hidden, other_decay, no_decay, seen = [], [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_readout = any(name == r or name.startswith(r + ".") for r in readout)
        if p.dim() < 2:
            no_decay.append(p)
        elif id(p) in emb or is_readout:
            other_decay.append(p)
        else:
            hidden.append(p)
    groups = [
        {"params": hidden, "weight_decay": weight_decay, "lr_scale": 1.0 / width_mult},
        {"params": other_decay, "weight_decay": weight_decay, "lr_scale": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    return [g for g in groups if g["params"]]
