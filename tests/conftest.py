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


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """Every test leaves torch's process-wide settings as it found them (thread count, default
    dtype, grad mode, deterministic algorithms), whatever it changes inside."""
    threads = torch.get_num_threads()
    dtype = torch.get_default_dtype()
    grad = torch.is_grad_enabled()
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture
def one_error_line():
    """``check(err) -> line``: asserts that ``err`` (captured stderr of ``seismo.cli.main``) is
    exactly one ``seismo: error: ...`` line without a traceback, and returns it."""

    def check(err: str) -> str:
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert "Traceback" not in err
        assert lines[0].startswith("seismo: error: "), lines[0]
        return lines[0]

    return check
