"""Curvature (sharpness) probes for training-instability monitoring.

*Sharpness* is the largest eigenvalue of the Hessian of the training loss,
measured on a fixed batch.  It is the quantity behind the "edge of
stability" picture of training dynamics:

* Cohen et al. 2021, "Gradient Descent on Neural Networks Typically Occurs
  at the Edge of Stability" (arXiv:2103.00065): under full-batch gradient
  descent with step size ``lr``, sharpness rises ("progressive sharpening")
  until it reaches the stability threshold ``2 / lr`` and then hovers there.
  With heavy-ball momentum ``beta`` the threshold becomes
  ``(2 + 2 * beta) / lr``.
* Cohen et al. 2022, "Adaptive Gradient Methods at the Edge of Stability"
  (arXiv:2207.14484): for Adam the relevant quantity is the *preconditioned*
  sharpness, the top eigenvalue of ``P^{-1} H`` (equivalently
  ``P^{-1/2} H P^{-1/2}``) with ``P = (1 - beta1^t) diag(sqrt(v_hat) + eps)``,
  and its threshold is ``(2 + 2 * beta1) / ((1 - beta1) * lr)``
  (``38 / lr`` at ``beta1 = 0.9``), derived for Adam / AdamW only.
* The optimizer-derived quantities (the Adam preconditioner and the
  stability thresholds) live in :mod:`seismo.monitor.stability` and are
  re-exported here.
* Gilmer et al. 2022, "A Loss Curvature Perspective on Training Instability
  in Deep Learning" (arXiv:2110.04369): tracks the top Hessian eigenvalue
  (and its preconditioned variant) with Lanczos during training and links
  instabilities / loss spikes to curvature exceeding the threshold.

The top eigenvalue is computed matrix-free with Lanczos iteration on
Hessian-vector products obtained by double backpropagation (Pearlmutter's
trick), so nothing of size ``n_params**2`` is ever formed.

Design rules shared by every function here:

* **Observation must not perturb training.**  Parameters, their ``.grad``,
  optimizer state, module buffers, the modules' train/eval flags and the
  global torch RNG state are left exactly as they were.  Random start /
  probe vectors come from a local :class:`torch.Generator`.
* **Device-agnostic, no global state.**  Results are 0-d tensors on the
  parameters' device.  The iterative solvers do synchronise with the host
  (convergence / breakdown checks); they are meant to run as an
  every-N-steps probe, not in the hot path.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from seismo.monitor.stability import _default_dtype_for, adam_preconditioner, has_stability_threshold, stability_threshold

__all__ = [
    "hvp_fn",
    "lanczos_top_eigenvalue",
    "power_iteration_top_eigenvalue",
    "hutchinson_trace",
    "sharpness",
    "adam_preconditioner",
    "has_stability_threshold",
    "stability_threshold",
]

MatVec = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


@contextmanager
def _preserve_rng(devices: Iterable[torch.device] = ()) -> Iterator[None]:
    """Save the global RNG state(s) and restore them on exit.

    Always covers the CPU generator; additionally the per-device generator of
    every CUDA device in ``devices`` and the MPS generator if MPS is used.
    """
    cpu_state = torch.get_rng_state()
    cuda_states: dict[int, Tensor] = {}
    mps_state: Tensor | None = None
    for dev in devices:
        if dev.type == "cuda" and torch.cuda.is_available():
            idx = dev.index if dev.index is not None else torch.cuda.current_device()
            if idx not in cuda_states:
                cuda_states[idx] = torch.cuda.get_rng_state(idx)
        elif dev.type == "mps" and mps_state is None and hasattr(torch, "mps"):
            mps_state = torch.mps.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        for idx, state in cuda_states.items():
            torch.cuda.set_rng_state(state, idx)
        if mps_state is not None:
            torch.mps.set_rng_state(mps_state)


@contextmanager
def _math_sdpa() -> Iterator[None]:
    """Force the pure-math scaled-dot-product-attention backend.

    The fused SDPA kernels (flash / memory-efficient / cuDNN) do not
    implement double backward on every backend; the math backend is composed
    of ordinary differentiable ops, so Hessian-vector products work.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - very old torch
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


def _local_generator(seed: int, device: torch.device) -> torch.Generator:
    """A private generator (never the global one) on ``device`` if possible."""
    try:
        gen = torch.Generator(device=device)
    except (RuntimeError, TypeError):
        gen = torch.Generator()
    gen.manual_seed(int(seed))
    return gen


def _randn(dim: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.randn(dim, generator=gen, dtype=dtype, device=gen.device).to(device)


def _resolve_device(device: torch.device | str | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def _as_param_list(model_or_params: nn.Module | Iterable[Tensor]) -> list[Tensor]:
    if isinstance(model_or_params, nn.Module):
        return [p for p in model_or_params.parameters() if p.requires_grad]
    if isinstance(model_or_params, Tensor):
        return [model_or_params]
    return list(model_or_params)


# --------------------------------------------------------------------------
# Hessian-vector products
# --------------------------------------------------------------------------


def hvp_fn(loss_fn: Callable[[], Tensor], params: Sequence[Tensor]) -> MatVec:
    """Build a Hessian-vector-product operator for ``loss_fn`` w.r.t. ``params``.

    Uses double backpropagation (Pearlmutter 1994): ``H v = d/dp (g(p) . v)``
    with ``g = dL/dp`` computed with ``create_graph=True``.  This is the
    operator fed to Lanczos to measure sharpness as in Cohen et al. 2021
    (arXiv:2103.00065) and Gilmer et al. 2022 (arXiv:2110.04369).

    **Evaluation strategy.**  ``loss_fn`` is evaluated *exactly once*, when
    ``hvp_fn`` is called, and the first-order gradient graph is kept alive
    (``retain_graph=True``) for as long as the returned closure exists.  Each
    product then costs one backward pass through that graph (roughly two
    ordinary backward passes) instead of forward + backward + double backward,
    at the price of holding the double-backward graph in memory.  Because the
    forward runs once, stochastic layers (dropout) use one fixed mask, so all
    products are against the same, well-defined Hessian.  Drop the closure to
    free the graph.

    The forward runs under ``sdpa_kernel(SDPBackend.MATH)`` because double
    backward through fused ``scaled_dot_product_attention`` kernels is not
    supported on every backend, and under :func:`torch.enable_grad` so the
    probe also works when called from a ``torch.no_grad()`` region.  The
    global RNG state is saved and restored around the forward.

    Gradients are obtained with :func:`torch.autograd.grad`, so ``p.grad`` is
    never written.  Module buffers (e.g. BatchNorm running statistics) *are*
    updated by the forward if the model is in training mode; :func:`sharpness`
    restores them, this low-level function does not know about modules.

    Args:
        loss_fn: zero-argument callable returning a scalar loss tensor.
        params: tensors that require grad; the Hessian is taken over their
            concatenation in this order (each flattened with ``reshape(-1)``).

    Returns:
        ``matvec(v) -> H @ v``: ``v`` is a flat tensor of length
        ``sum(p.numel())``; the result has ``v``'s dtype and device.  The
        Hessian itself is evaluated in the parameters' dtype.
    """
    params = list(params)
    if not params:
        raise ValueError("hvp_fn: `params` is empty")
    for i, p in enumerate(params):
        if not p.requires_grad:
            raise ValueError(
                f"hvp_fn: params[{i}] (shape {tuple(p.shape)}) does not require grad; "
                "pass only trainable parameters"
            )
    numels = [p.numel() for p in params]
    dim = sum(numels)

    with _preserve_rng({p.device for p in params}), torch.enable_grad(), _math_sdpa():
        loss = loss_fn()
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError("hvp_fn: loss_fn() must return a scalar (one-element) tensor")
        loss = loss.reshape(())
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)

    # Only gradient entries that still depend on the parameters contribute to
    # H v; constant (or absent) gradients have zero second derivative.
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]

    def matvec(v: Tensor) -> Tensor:
        if v.shape != (dim,):
            raise ValueError(f"hvp: expected a flat vector of shape ({dim},), got {tuple(v.shape)}")
        if not live:
            return torch.zeros_like(v)
        chunks = torch.split(v, numels)
        outs = [grads[i] for i in live]
        grad_outputs = [chunks[i].reshape(params[i].shape).to(params[i]) for i in live]
        with torch.enable_grad():
            hv = torch.autograd.grad(
                outs, params, grad_outputs=grad_outputs, retain_graph=True, allow_unused=True
            )
        pieces = [
            torch.zeros(n, dtype=v.dtype, device=v.device)
            if h is None
            else h.reshape(-1).to(device=v.device, dtype=v.dtype)
            for h, n in zip(hv, numels)
        ]
        return torch.cat(pieces)

    return matvec


# --------------------------------------------------------------------------
# Eigen / trace estimators
# --------------------------------------------------------------------------


def lanczos_top_eigenvalue(
    matvec: MatVec,
    dim: int,
    *,
    iters: int = 20,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    tol: float | None = None,
) -> Tensor:
    """Largest (algebraic) eigenvalue of a symmetric operator by Lanczos.

    This is the estimator used by Gilmer et al. 2022 (arXiv:2110.04369) and
    Cohen et al. 2021/2022 (arXiv:2103.00065, 2207.14484) to track sharpness.
    ``min(iters, dim)`` Lanczos steps are taken from a random Gaussian start
    vector drawn from a local generator seeded with ``seed`` (the global RNG
    is never touched).  Every new Lanczos vector is fully re-orthogonalised
    (two passes of classical Gram-Schmidt) against all previous ones, so the
    Ritz values do not suffer from the ghost eigenvalues of plain Lanczos;
    memory is ``(iters + 1) * dim`` elements of ``dtype``.

    *Breakdown*: if the residual norm ``beta_j`` falls below
    ``tol * ||T||`` the Krylov space is exhausted (it is an invariant
    subspace), the Ritz values are exact eigenvalues, and the iteration
    stops early.  With a random start vector the invariant subspace contains
    the top eigenvector with probability one.

    The result is the largest eigenvalue of the tridiagonal matrix ``T``;
    Ritz values always lie inside the spectrum, so it is a lower bound on the
    true top eigenvalue that converges from below.  If the operator returns
    non-finite values (e.g. a diverged model) the result is ``nan``.

    Args:
        matvec: symmetric linear map on flat vectors of length ``dim``.
        dim: operator dimension.
        iters: maximum number of Lanczos steps (= matvec calls).
        seed: seed of the local generator for the start vector.
        dtype: working precision of the Lanczos vectors (float64 default).
        device: device of the Lanczos vectors (default CPU).
        tol: relative breakdown tolerance; default ``100 * eps(dtype)``.

    Returns:
        0-d tensor of ``dtype`` on ``device``.
    """
    if dim < 1:
        raise ValueError(f"lanczos_top_eigenvalue: dim must be >= 1, got {dim}")
    if iters < 1:
        raise ValueError(f"lanczos_top_eigenvalue: iters must be >= 1, got {iters}")
    dev = _resolve_device(device)
    if tol is None:
        tol = 100.0 * torch.finfo(dtype).eps
    m = min(int(iters), int(dim))

    gen = _local_generator(seed, dev)
    q = _randn(dim, gen, dtype, dev)
    q = q / torch.linalg.vector_norm(q)

    Q = torch.empty(m, dim, dtype=dtype, device=dev)
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    anorm = 0.0
    beta_prev: Tensor | None = None
    for j in range(m):
        Q[j] = q
        w = matvec(q).to(device=dev, dtype=dtype)
        alpha = torch.dot(q, w)
        w = w - alpha * q
        if beta_prev is not None:
            w = w - beta_prev * Q[j - 1]
        # Full re-orthogonalisation ("twice is enough").
        basis = Q[: j + 1]
        for _ in range(2):
            w = w - basis.T @ (basis @ w)
        beta = torch.linalg.vector_norm(w)
        alphas.append(alpha)

        a_val, b_val = float(alpha), float(beta)  # host sync: fine for a probe
        if not (math.isfinite(a_val) and math.isfinite(b_val)):
            return torch.full((), float("nan"), dtype=dtype, device=dev)
        anorm = max(anorm, abs(a_val), b_val)
        if j == m - 1 or b_val <= tol * anorm:
            break  # done, or Krylov space exhausted (invariant subspace found)
        betas.append(beta)
        q = w / beta
        beta_prev = beta

    k = len(alphas)
    T = torch.diag(torch.stack(alphas))
    if k > 1:
        off = torch.stack(betas[: k - 1])
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigvalsh(T)[-1]


def _power_iteration(
    matvec: MatVec, v: Tensor, shift: Tensor | float, iters: int, tol: float
) -> Tensor:
    """Dominant eigenvalue (Rayleigh quotient) of ``A - shift * I``."""
    lam = torch.zeros((), dtype=v.dtype, device=v.device)
    prev = None
    for _ in range(iters):
        w = matvec(v).to(device=v.device, dtype=v.dtype) - shift * v
        lam = torch.dot(v, w)
        nrm = torch.linalg.vector_norm(w)
        lam_f, nrm_f = float(lam), float(nrm)  # host sync: fine for a probe
        if not (math.isfinite(lam_f) and math.isfinite(nrm_f)):
            return torch.full((), float("nan"), dtype=v.dtype, device=v.device)
        if nrm_f == 0.0:
            break  # v is in the null space: eigenvalue 0 of the shifted operator
        v = w / nrm
        if prev is not None and abs(lam_f - prev) <= tol * max(abs(lam_f), 1e-300):
            break
        prev = lam_f
    return lam


def power_iteration_top_eigenvalue(
    matvec: MatVec,
    dim: int,
    *,
    iters: int = 50,
    tol: float = 1e-6,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """Largest (algebraic) eigenvalue of a symmetric operator by power iteration.

    A simpler, slower-converging alternative to
    :func:`lanczos_top_eigenvalue` (Cohen et al. 2021, arXiv:2103.00065, use
    Lanczos; power iteration is the classic baseline).  Plain power iteration
    converges to the eigenvalue of largest *magnitude*.  If that estimate is
    negative (the Hessian has a negative eigenvalue dominating in magnitude,
    common early in training), a second run on the shifted operator
    ``A - mu I`` (``mu`` = the first estimate, so the shifted spectrum is
    non-negative) finds ``lambda_max - mu``, and ``mu`` is added back.

    Stops when the relative change of the Rayleigh quotient is ``<= tol`` or
    after ``iters`` matvecs per run.  The start vector comes from a local
    generator seeded with ``seed``.

    Returns:
        0-d tensor of ``dtype`` on ``device`` (``nan`` if the operator
        produced non-finite values).
    """
    if dim < 1:
        raise ValueError(f"power_iteration_top_eigenvalue: dim must be >= 1, got {dim}")
    if iters < 1:
        raise ValueError(f"power_iteration_top_eigenvalue: iters must be >= 1, got {iters}")
    dev = _resolve_device(device)
    gen = _local_generator(seed, dev)
    v0 = _randn(dim, gen, dtype, dev)
    v0 = v0 / torch.linalg.vector_norm(v0)

    lam = _power_iteration(matvec, v0, 0.0, iters, tol)
    if not bool(torch.isfinite(lam)) or float(lam) >= 0.0:
        return lam
    shifted = _power_iteration(matvec, v0, lam, iters, tol)
    return shifted + lam


def hutchinson_trace(
    matvec: MatVec,
    dim: int,
    *,
    samples: int = 10,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """Hutchinson's stochastic trace estimator ``mean_i z_i^T A z_i``.

    Probes ``z_i`` are Rademacher (+-1) vectors from a local generator seeded
    with ``seed`` (the global RNG is untouched).  Unbiased; for a diagonal
    operator every probe gives the exact trace since ``z_k^2 = 1``.  The
    Hessian trace complements the top eigenvalue as a bulk curvature
    measure (cf. Gilmer et al. 2022, arXiv:2110.04369).

    Returns:
        0-d tensor of ``dtype`` on ``device``.
    """
    if dim < 1:
        raise ValueError(f"hutchinson_trace: dim must be >= 1, got {dim}")
    if samples < 1:
        raise ValueError(f"hutchinson_trace: samples must be >= 1, got {samples}")
    dev = _resolve_device(device)
    gen = _local_generator(seed, dev)
    total = torch.zeros((), dtype=dtype, device=dev)
    for _ in range(int(samples)):
        z = torch.randint(0, 2, (dim,), generator=gen, device=gen.device).to(device=dev, dtype=dtype)
        z = 2.0 * z - 1.0
        total = total + torch.dot(z, matvec(z).to(device=dev, dtype=dtype))
    return total / samples


# --------------------------------------------------------------------------
# Sharpness
# --------------------------------------------------------------------------


def sharpness(
    model_or_params: nn.Module | Iterable[Tensor],
    loss_fn: Callable[[], Tensor],
    *,
    iters: int = 20,
    preconditioner: Tensor | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Top eigenvalue of the loss Hessian on a fixed batch (sharpness).

    Sharpness as defined by Cohen et al. 2021 (arXiv:2103.00065) and Gilmer
    et al. 2022 (arXiv:2110.04369): ``lambda_max(H)`` with ``H`` the Hessian
    of ``loss_fn()`` w.r.t. the parameters, estimated with ``iters`` Lanczos
    steps on Hessian-vector products (see :func:`hvp_fn`).

    If ``preconditioner`` is given it must be the flat diagonal ``P`` of a
    diagonal preconditioner (e.g. from :func:`adam_preconditioner`), and the
    *preconditioned* sharpness ``lambda_max(P^{-1/2} H P^{-1/2})`` of Cohen et
    al. 2022 (arXiv:2207.14484) is returned; compare it with
    :func:`stability_threshold` of the Adam optimizer.  Entries of ``P`` equal
    to ``+inf`` remove their coordinates from the operator.

    Observation does not perturb training: parameters and ``.grad`` are never
    written (``torch.autograd.grad`` is used, and every ``p.grad`` is
    re-attached afterwards), optimizer state is not read here, the global RNG
    state is restored, and when a module is passed its buffers (e.g.
    BatchNorm running statistics, which a training-mode forward updates) and
    the train/eval flag of every submodule are restored as well.  The
    model's mode is *not* changed: the Hessian is that of the loss as
    ``loss_fn`` computes it (dropout, if active, uses one fixed mask).

    Args:
        model_or_params: an ``nn.Module`` (its parameters with
            ``requires_grad``) or an iterable of parameter tensors.
        loss_fn: zero-argument closure computing the loss on a fixed batch.
        iters: Lanczos steps (Hessian-vector products).
        preconditioner: optional flat positive tensor ``P`` (length = number
            of parameter elements, same order as the parameters).
        seed: seed of the local generator for the Lanczos start vector.
        dtype: Lanczos working precision; default float64 (float32 on MPS).

    Returns:
        0-d tensor on the first parameter's device.
    """
    module = model_or_params if isinstance(model_or_params, nn.Module) else None
    params = _as_param_list(model_or_params)
    if not params:
        raise ValueError("sharpness: no parameters requiring grad")
    dim = sum(p.numel() for p in params)
    device = params[0].device
    work_dtype = dtype if dtype is not None else _default_dtype_for(device)

    scale: Tensor | None = None
    if preconditioner is not None:
        P = preconditioner.reshape(-1)
        if P.numel() != dim:
            raise ValueError(
                f"sharpness: preconditioner has {P.numel()} entries, parameters have {dim}"
            )
        scale = P.to(device=device, dtype=work_dtype).rsqrt()  # P^{-1/2}

    saved_grads = [p.grad for p in params]
    saved_modes: list[tuple[nn.Module, bool]] = []
    saved_buffers: list[tuple[Tensor, Tensor]] = []
    if module is not None:
        saved_modes = [(m, m.training) for m in module.modules()]
        saved_buffers = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        hvp = hvp_fn(loss_fn, params)
        if scale is None:
            op = hvp
        else:
            s = scale

            def op(v: Tensor) -> Tensor:
                return s * hvp(s * v)

        return lanczos_top_eigenvalue(
            op, dim, iters=iters, seed=seed, dtype=work_dtype, device=device
        )
    finally:
        for p, g in zip(params, saved_grads):
            if p.grad is not g:
                p.grad = g
        for m, mode in saved_modes:
            m.training = mode
        with torch.no_grad():
            for b, saved in saved_buffers:
                # Only write back buffers that changed, so an unchanged buffer
                # keeps its autograd version counter (a pending user graph
                # that saved it stays valid).
                if not torch.equal(b, saved):
                    b.copy_(saved)
