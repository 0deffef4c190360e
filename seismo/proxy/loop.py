"""One monitored training step: the loop body the README shows, shared by tests and benchmarks.

    for batch in batches:
        train_step(model, optimizer, loss_of, batch, monitor=monitor)

is ``loss = loss_of(model, batch)``; ``zero_grad``; ``backward``; optional clipping;
``optimizer.step()``; ``monitor.step(loss)`` when a monitor is given.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = ["train_step", "gpt_loss"]


def gpt_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The loss of a nanoGPT-style model that returns ``(logits, loss)`` for ``model(x, y)``."""
    x, y = batch
    return model(x, y)[1]


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_of: Callable[[nn.Module, Any], Tensor],
    batch: Any,
    *,
    monitor: Any = None,
    clip: float | None = None,
) -> Tensor:
    """Run one step and return the loss, detached (no host sync: it stays on the device)."""
    loss = loss_of(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    if monitor is not None:
        monitor.step(loss)
    return loss.detach()
