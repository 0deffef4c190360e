"""Find the real model and optimizer inside the wrappers that training frameworks put around them.

Unwrapped, in this order, as many times as they nest:

- models: ``DistributedDataParallel`` / ``DataParallel`` (``.module``), ``torch.compile``'s
  ``OptimizedModule`` (``._orig_mod``), FSDP1 (``.module``; FSDP2's ``fully_shard`` keeps the
  model's own class, nothing to unwrap);
- optimizers: Accelerate's ``AcceleratedOptimizer`` (``.optimizer``), Lightning's
  ``LightningOptimizer`` (``._optimizer``), DeepSpeed-style wrappers (``.optimizer``).
  ``ZeroRedundancyOptimizer`` is a real ``torch.optim.Optimizer`` and is used as it is.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from seismo.errors import ConfigError

__all__ = ["unwrap_model", "unwrap_optimizer"]

_MODEL_ATTRS = ("module", "_orig_mod")
_OPTIMIZER_ATTRS = ("optimizer", "_optimizer")


def unwrap_model(model: object) -> nn.Module:
    """The innermost ``nn.Module`` of ``model``; a ConfigError naming the type if it is none."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: expected a torch.nn.Module, got {type(model).__module__}.{type(model).__qualname__}")
    seen = 0
    while seen < 16:  # wrappers nest a few levels at most; the bound guards against cycles
        inner = next((getattr(model, a) for a in _MODEL_ATTRS if isinstance(getattr(model, a, None), nn.Module)), None)
        if inner is None or inner is model:
            return model
        model, seen = inner, seen + 1
    return model


def unwrap_optimizer(optimizer: object) -> torch.optim.Optimizer:
    """The innermost ``torch.optim.Optimizer`` of ``optimizer``.

    Raises ConfigError naming the type when neither ``optimizer`` nor anything it wraps is an
    optimizer (a model or a scheduler passed by mistake, say).
    """
    if isinstance(optimizer, torch.optim.lr_scheduler.LRScheduler):  # it holds .optimizer, but it is no wrapper
        raise ConfigError(f"optimizer: expected a torch.optim.Optimizer (or a wrapper of one), got the LR scheduler "
                          f"{type(optimizer).__module__}.{type(optimizer).__qualname__}")
    current = optimizer
    for _ in range(16):
        if isinstance(current, torch.optim.Optimizer) and not any(
            isinstance(getattr(current, a, None), torch.optim.Optimizer) for a in _OPTIMIZER_ATTRS
        ):
            return current
        inner = next((getattr(current, a) for a in _OPTIMIZER_ATTRS if getattr(current, a, None) is not None), None)
        if inner is None or inner is current:
            break
        current = inner
    if isinstance(current, torch.optim.Optimizer):
        return current
    raise ConfigError(
        f"optimizer: expected a torch.optim.Optimizer (or a wrapper of one), got "
        f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
    )
