"""``seismo.proxy.loop.train_step`` is exactly the hand-written loop body."""

from __future__ import annotations

import torch

from seismo.proxy.loop import train_step


def _model_and_opt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def test_train_step_matches_the_loop_it_replaces_bitwise():
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen)) for _ in range(5)]
    model_a, opt_a = _model_and_opt()
    losses_a = [train_step(model_a, opt_a, _mse, b, clip=0.5) for b in batches]
    model_b, opt_b = _model_and_opt()
    losses_b = []
    for b in batches:
        loss = _mse(model_b, b)
        opt_b.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model_b.parameters(), 0.5)
        opt_b.step()
        losses_b.append(loss.detach())
    assert all(torch.equal(a, b) for a, b in zip(losses_a, losses_b))
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))
    assert not losses_a[0].requires_grad


def test_train_step_hands_the_loss_to_the_monitor():
    seen = []

    class Recorder:
        def step(self, loss):
            seen.append(loss)

    model, opt = _model_and_opt()
    loss = train_step(model, opt, _mse, (torch.ones(2, 4), torch.zeros(2, 1)), monitor=Recorder())
    assert len(seen) == 1 and torch.equal(seen[0].detach(), loss)
