"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one torch thread is faster and immune to oversubscription on a shared CPU (an
    idle second OpenMP thread spinning can make tiny kernels 1000x slower). Restores the count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
