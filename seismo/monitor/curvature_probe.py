"""Curvature probe: ``hessian/max_eig``, ``hessian/max_eig_precond``, ``hessian/threshold``,
``hessian/trace`` (the ``hessian`` prefix is the probe's instance name).

* ``max_eig`` — sharpness, the top eigenvalue of the Hessian of ``probe_loss(model)`` (a fixed
  probe batch), by Lanczos on Hessian-vector products (Cohen et al. 2021, arXiv 2103.00065;
  Gilmer et al. 2022, arXiv 2110.04369).
* ``max_eig_precond`` — for optimizers with Adam state (``betas``, ``eps``, ``exp_avg_sq``), the
  top eigenvalue of ``P^-1 H`` (computed as ``P^-1/2 H P^-1/2``) with the bias-corrected
  preconditioner ``P = (1 - beta1^t) diag(sqrt(v_hat) + eps)`` read from the optimizer state
  (Cohen et al. 2022, arXiv 2207.14484, "adaptive edge of stability"; see
  :func:`~seismo.monitor.curvature.adam_preconditioner`).
* ``threshold`` — the quadratic-model stability threshold at the current lr, only for the
  optimizers it is derived for: ``2 / lr`` for gradient descent and ``(2 + 2 beta) / lr`` for
  heavy-ball momentum (Cohen et al. 2021; compare with ``max_eig``), the Nesterov form, and
  ``(2 + 2 beta1) / ((1 - beta1) lr)`` (``38 / lr`` at beta1 = 0.9) for ``torch.optim.Adam`` /
  ``AdamW`` (Cohen et al. 2022; compare with ``max_eig_precond``). Other optimizers (NAdam,
  LAMB, SPAM, ...) get ``max_eig`` and ``max_eig_precond`` but no threshold, since none is
  derived for their update (:func:`~seismo.monitor.curvature.stability_threshold`).
* ``trace`` (``trace=True``) — Hutchinson's estimate of the Hessian trace.

Everything is computed in :meth:`CurvatureProbe.collect`, i.e. after the optimizer step, on the
parameters the next step starts from. The Hessian-vector-product graph is built once per tracked
step and shared by every estimator. Observation does not perturb training: parameters, ``.grad``,
optimizer state, module buffers, train/eval flags and the global RNG are left as they were
(random vectors come from a private generator). The Lanczos iteration synchronises with the
host, so this probe belongs on a sparse schedule (every 100 steps unless told; the `full` preset uses every 500).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn as nn
from torch import Tensor

from seismo.monitor.curvature import (
    adam_preconditioner,
    has_stability_threshold,
    hutchinson_trace,
    hvp_fn,
    lanczos_top_eigenvalue,
    stability_threshold,
)
from seismo.monitor.probe import HookedProbe, ProbeContext, ProbeFailure, warn_once
from seismo.monitor.tracking import Schedule

__all__ = ["CurvatureProbe"]


@contextmanager
def _untouched(model: nn.Module, params: list[Tensor]) -> Iterator[None]:
    """Restore ``.grad``, train/eval flags and buffers of ``model`` on exit (the global RNG is
    restored by :func:`hvp_fn` itself)."""
    grads = [p.grad for p in params]
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        for p, g in zip(params, grads):
            if p.grad is not g:
                p.grad = g
        for m, mode in modes:
            m.training = mode
        with torch.no_grad():
            for b, saved in buffers:
                if not torch.equal(b, saved):  # leave unchanged buffers' version counters alone
                    b.copy_(saved)


class CurvatureProbe(HookedProbe):
    """Sharpness of a fixed probe batch, plain and Adam-preconditioned, against its threshold.

    Args:
        probe_loss: ``f(model) -> scalar loss`` on a fixed batch (keep it small: each Lanczos
            step costs about two backward passes through it). The model is passed in its current
            train/eval mode; ``probe_loss`` may switch it (e.g. ``model.eval()`` for a
            dropout-free Hessian): modes are restored afterwards.
        name: instance name, the prefix of the signals.
        schedule: tracked steps (default every 100 steps; the ``full`` preset passes every 500).
        iters: Lanczos steps (Hessian-vector products) per eigenvalue.
        trace: also estimate the Hessian trace with ``trace_samples`` Rademacher probes.
        seed: seed of the private generator for Lanczos start vectors and trace probes.
    """

    default_every = 100

    def __init__(
        self,
        probe_loss: Callable[[nn.Module], Tensor],
        name: str = "hessian",
        schedule: Schedule | None = None,
        iters: int = 20,
        trace: bool = False,
        trace_samples: int = 10,
        seed: int = 0,
    ):
        if not callable(probe_loss):
            raise TypeError(f"probe_loss must be a callable model -> loss, got {type(probe_loss).__name__}")
        if iters < 1 or trace_samples < 1:
            raise ValueError("CurvatureProbe needs iters >= 1 and trace_samples >= 1")
        super().__init__(name, schedule)
        self.probe_loss = probe_loss
        self.iters = iters
        self.trace = trace
        self.trace_samples = trace_samples
        self.seed = seed
        self._warned: set[str] = set()

    def setup(self, ctx: ProbeContext) -> None:
        self.model = ctx.model
        self.optimizer = ctx.optimizer
        self.params = [p for p in ctx.model.parameters() if p.requires_grad]
        if not self.params:
            raise ProbeFailure("the model has no trainable parameters")
        self.dim = sum(p.numel() for p in self.params)
        opt = ctx.optimizer
        groups = opt.param_groups if opt is not None else []
        # Preconditioned sharpness needs Adam's second moment; parameters the optimizer does not
        # manage are not moved by it and drop out of the preconditioned operator (P = inf).
        self._adam = any("betas" in g and "eps" in g for g in groups)
        managed = {id(p) for g in groups for p in g["params"]}
        self._managed = [id(p) in managed for p in self.params]
        # Only where a threshold is derived: SGD (GD, heavy ball, Nesterov) and torch Adam / AdamW.
        self._threshold = opt is not None and has_stability_threshold(opt)

    def _preconditioner(self) -> Tensor | None:
        if not self._adam or not any(self._managed):
            return None
        managed = [p for p, m in zip(self.params, self._managed) if m]
        try:
            P = adam_preconditioner(self.optimizer, managed)
        except ValueError as exc:
            warn_once(self._warned, "precond", f"seismo: {self.name}/max_eig_precond is off: {exc}")
            self._adam = False
            return None
        if P is None or all(self._managed):
            return P
        full = torch.full((self.dim,), math.inf, dtype=P.dtype, device=P.device)
        pos, src = 0, 0
        for p, m in zip(self.params, self._managed):
            n = p.numel()
            if m:
                full[pos : pos + n] = P[src : src + n]
                src += n
            pos += n
        return full

    def _threshold_value(self, device: torch.device) -> Tensor | None:
        if not self._threshold:
            return None
        if float(self.optimizer.param_groups[0]["lr"]) == 0.0:
            return torch.tensor(math.inf, device=device)
        return torch.tensor(stability_threshold(self.optimizer), device=device)

    def compute(self, step: int, loss: Tensor | None) -> dict[str, Tensor]:
        device = self.params[0].device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        with _untouched(self.model, self.params):
            out = self._eigenvalues(step, device, dtype)  # the double-backward graph is freed on return
        thr = self._threshold_value(device)
        if thr is not None:
            out[f"{self.name}/threshold"] = thr
        return out

    def _eigenvalues(self, step: int, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        lanczos = dict(iters=self.iters, seed=self.seed + step, dtype=dtype, device=device)
        out: dict[str, Tensor] = {}
        hvp = hvp_fn(lambda: self.probe_loss(self.model), self.params)
        out[f"{self.name}/max_eig"] = lanczos_top_eigenvalue(hvp, self.dim, **lanczos)
        P = self._preconditioner()
        if P is not None:
            # eig(P^-1 H) = eig(P^-1/2 H P^-1/2), a symmetric operator for Lanczos
            s = P.to(device=device, dtype=dtype).rsqrt()  # P^-1/2; 0 where P = inf
            out[f"{self.name}/max_eig_precond"] = lanczos_top_eigenvalue(lambda v: s * hvp(s * v), self.dim, **lanczos)
        if self.trace:
            out[f"{self.name}/trace"] = hutchinson_trace(
                hvp, self.dim, samples=self.trace_samples, seed=self.seed + step, dtype=dtype, device=device
            )
        return out
