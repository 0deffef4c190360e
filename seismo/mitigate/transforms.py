"""Gradient transforms in the optax style, attached to an unchanged ``torch.optim`` optimizer.

A transform is a :class:`GradientTransform` ``(init, update)`` pair:

* ``state = tx.init(params)`` builds the transform's state, a NamedTuple of tensors;
* ``grads, state = tx.update(grads, state, params)`` returns new gradients and a new state.

``update`` never mutates its inputs and never syncs with the host (no ``.item()``, ``float()`` or
``bool(tensor)``): every decision is a ``torch.where`` on the device. :func:`chain` composes
transforms left to right, and :func:`attach` runs a transform right before each
``optimizer.step()`` (a step pre-hook), writing the result into ``p.grad`` in place. The
transform state travels inside ``optimizer.state_dict()`` and comes back with
``optimizer.load_state_dict()``, so a resumed run follows the same trajectory.

Every state carries ``count``: the number of updates the transform has seen (a 0-d int64 tensor).
Clipping transforms also count ``clipped``: the number of updates in which they changed the
gradient. The counters are tensors, so reading them is the caller's (single) sync.

    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    tx = chain(skip_if_nonfinite(), measure("pre"), clip_by_global_norm(1.0), measure("post"))
    handle = attach(opt, tx)
    ...                        # loss.backward(); opt.step() as usual
    measured(opt, "pre")       # 0-d tensor: the global norm before clipping, this step
    state_of(opt, "skip_if_nonfinite").last_skipped
    handle.remove()

References are given in each factory's docstring; see docs/MITIGATE.md for the overview.
"""

from __future__ import annotations

import math
import types
import warnings
from typing import Any, Callable, Iterable, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "GradientTransform", "TransformHandle", "REGISTRY", "STATE_DICT_KEY",
    "chain", "attach", "state_of", "measured", "global_norm",
    "clip_by_global_norm", "clip_by_value", "clip_per_coordinate", "adaptive_gradient_clipping",
    "zscore_norm_clip", "skip_if_nonfinite", "orthogonalize", "measure", "adagc", "zclip",
    "ChainState", "ClipState", "PerCoordinateClipState", "AGCState", "ZScoreClipState",
    "SkipNonFiniteState", "OrthogonalizeState", "MeasureState", "AdaGCState", "ZClipState",
]

#: Top-level key under which :func:`attach` stores transform states in ``optimizer.state_dict()``.
STATE_DICT_KEY = "seismo_transforms"
_HANDLES_ATTR = "_seismo_transform_handles"


class GradientTransform(NamedTuple):
    """An ``(init, update)`` pair; ``name`` identifies the instance, ``parts`` are a chain's members."""

    init: Callable[[list[Tensor]], Any]
    update: Callable[[list[Tensor], Any, list[Tensor]], tuple[list[Tensor], Any]]
    name: str = ""
    parts: tuple["GradientTransform", ...] = ()


# ---------------------------------------------------------------------------------------------
# States. Every field is a tensor (or a tuple of per-parameter tensors); counters are 0-d int64.


class ChainState(NamedTuple):
    """State of :func:`chain`: ``inner[i]`` is the state of the i-th member."""

    inner: tuple


class ClipState(NamedTuple):
    """State of :func:`clip_by_global_norm` and :func:`clip_by_value`.

    count: updates seen. clipped: updates in which at least one value was changed.
    """

    count: Tensor
    clipped: Tensor


class PerCoordinateClipState(NamedTuple):
    """State of :func:`clip_per_coordinate`.

    count: updates seen. clipped: updates in which at least one coordinate was clipped.
    last_clipped: number of coordinates clipped in the latest update.
    nu: per parameter, the EMA of the (clipped) squared gradient, not bias-corrected.
    """

    count: Tensor
    clipped: Tensor
    last_clipped: Tensor
    nu: tuple[Tensor, ...]


class AGCState(NamedTuple):
    """State of :func:`adaptive_gradient_clipping`.

    count: updates seen. clipped: updates in which at least one unit was clipped.
    last_clipped: number of units (output rows) clipped in the latest update.
    """

    count: Tensor
    clipped: Tensor
    last_clipped: Tensor


class ZScoreClipState(NamedTuple):
    """State of :func:`zscore_norm_clip`.

    count: updates seen. clipped: updates whose global norm was clipped.
    history: ring buffer of accepted global norms (shape ``(window,)``); only the first
    ``filled`` entries are valid. filled: valid entries (<= window). pos: next slot to write.
    threshold: the threshold mean + z*std used in the latest update (``inf`` while inactive).
    """

    count: Tensor
    clipped: Tensor
    history: Tensor
    filled: Tensor
    pos: Tensor
    threshold: Tensor


class AdaGCState(NamedTuple):
    """State of :func:`adagc`.

    count: updates seen. clipped: updates in which at least one tensor was clipped.
    last_clipped: number of parameter tensors clipped in the latest update.
    gamma: per parameter, the 0-d EMA of its clipped gradient norm (the paper's gamma_{t,i}).
    """

    count: Tensor
    clipped: Tensor
    last_clipped: Tensor
    gamma: tuple[Tensor, ...]


class ZClipState(NamedTuple):
    """State of :func:`zclip`.

    count: updates seen. clipped: updates whose global norm was clipped.
    warm: the finite norms of the warm-up (shape ``(warmup,)``, first ``filled`` valid).
    filled: warm-up norms collected. mean, var: the EMA statistics (valid once ``filled == warmup``).
    threshold: the norm clipped to in the latest update (``inf`` if not clipped).
    """

    count: Tensor
    clipped: Tensor
    warm: Tensor
    filled: Tensor
    mean: Tensor
    var: Tensor
    threshold: Tensor


class SkipNonFiniteState(NamedTuple):
    """State of :func:`skip_if_nonfinite`.

    count: updates seen. skipped: updates whose gradients were replaced by zeros.
    last_skipped: 0-d bool, True if the latest update was zeroed (the flag to read).
    """

    count: Tensor
    skipped: Tensor
    last_skipped: Tensor


class OrthogonalizeState(NamedTuple):
    """State of :func:`orthogonalize`. count: updates seen."""

    count: Tensor


class MeasureState(NamedTuple):
    """State of :func:`measure`. count: updates seen. norm: global L2 norm at this position, latest update."""

    count: Tensor
    norm: Tensor


# ---------------------------------------------------------------------------------------------
# Small helpers


def _device(params: list[Tensor]) -> torch.device:
    return params[0].device if params else torch.device("cpu")


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are kept in: float64 for float64 tensors, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc_dtype(tensors: Iterable[Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _counter(device: torch.device) -> Tensor:
    return torch.zeros((), dtype=torch.int64, device=device)


def global_norm(grads: list[Tensor]) -> Tensor:
    """L2 norm of all gradients together, a 0-d tensor (float64 if any gradient is float64).

    Same reduction as ``torch.nn.utils.clip_grad_norm_``: the norm of the per-tensor norms.
    """
    dtype = _acc_dtype(grads)
    if not grads:
        return torch.zeros((), dtype=dtype)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=dtype) for g in grads]))


def _any(flags: list[Tensor], device: torch.device) -> Tensor:
    return torch.stack(flags).any() if flags else torch.zeros((), dtype=torch.bool, device=device)


# ---------------------------------------------------------------------------------------------
# chain


def chain(*transforms: GradientTransform, name: str = "chain") -> GradientTransform:
    """Compose transforms: the output gradients of one are the input of the next (optax ``chain``)."""
    parts = tuple(transforms)

    def init(params: list[Tensor]) -> ChainState:
        return ChainState(tuple(t.init(params) for t in parts))

    def update(grads: list[Tensor], state: ChainState, params: list[Tensor]) -> tuple[list[Tensor], ChainState]:
        new_states = []
        for t, s in zip(parts, state.inner, strict=True):
            grads, s = t.update(grads, s, params)
            new_states.append(s)
        return grads, ChainState(tuple(new_states))

    return GradientTransform(init, update, name, parts)


# ---------------------------------------------------------------------------------------------
# Transforms


def clip_by_global_norm(max_norm: float = 1.0, *, name: str = "clip_by_global_norm") -> GradientTransform:
    """Scale all gradients by ``min(1, max_norm / (norm + 1e-6))``, ``norm`` the global L2 norm.

    The same rule (and the same 1e-6) as ``torch.nn.utils.clip_grad_norm_``; the usual stabilizer of
    Transformer training, e.g. clip 1.0 in Wortsman et al. 2023 (arXiv 2309.14322). Pascanu et al.
    2013 (arXiv 1211.5063) introduced norm clipping for exploding gradients.
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")

    def init(params: list[Tensor]) -> ClipState:
        dev = _device(params)
        return ClipState(_counter(dev), _counter(dev))

    def update(grads: list[Tensor], state: ClipState, params: list[Tensor]) -> tuple[list[Tensor], ClipState]:
        norm = global_norm(grads)
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        out = [g * coef.to(g.dtype) for g in grads]
        return out, ClipState(state.count + 1, state.clipped + (norm > max_norm).long())

    return GradientTransform(init, update, name)


def clip_by_value(limit: float = 1.0, *, name: str = "clip_by_value") -> GradientTransform:
    """Clamp every gradient coordinate to ``[-limit, limit]`` (``torch.nn.utils.clip_grad_value_``).

    Element-wise clipping as used by Mikolov (2012, thesis) and discussed in Pascanu et al. 2013
    (arXiv 1211.5063). It changes the gradient direction; prefer :func:`clip_by_global_norm`.
    """
    if limit <= 0:
        raise ValueError(f"limit must be > 0, got {limit}")

    def init(params: list[Tensor]) -> ClipState:
        dev = _device(params)
        return ClipState(_counter(dev), _counter(dev))

    def update(grads: list[Tensor], state: ClipState, params: list[Tensor]) -> tuple[list[Tensor], ClipState]:
        hit = _any([(g.abs() > limit).any() for g in grads], state.count.device)
        out = [g.clamp(-limit, limit) for g in grads]
        return out, ClipState(state.count + 1, state.clipped + hit.long())

    return GradientTransform(init, update, name)


def clip_per_coordinate(
    k: float = math.sqrt(5000.0), beta: float = 0.999, warmup: int = 20, *, name: str = "clip_per_coordinate"
) -> GradientTransform:
    """Clip each coordinate to ``k`` times its running RMS (spike-aware clipping).

    Rule, per coordinate i, at update t (t = ``count``, updates seen before this one):

    * ``nu_hat = nu / (1 - beta**t)``, the bias-corrected EMA of g_i**2 over *previous* updates, so a
      spike does not raise its own threshold;
    * if ``t >= warmup`` and ``nu_hat > 0`` and ``|g_i| > k * sqrt(nu_hat)``:
      ``g_i <- sign(g_i) * k * sqrt(nu_hat)``;
    * then ``nu <- beta * nu + (1 - beta) * g_i**2`` with the *clipped* g_i (the spike stays out of the
      history); non-finite coordinates leave ``nu`` unchanged.

    This is SPAM's clipping (Huang et al. 2025, arXiv 2501.06842: mask ``g**2 > theta * v``, clip to
    ``sign(g) sqrt(theta * v)``) as a stand-alone transform for any optimizer: the defaults
    ``k = sqrt(5000)`` (SPAM's theta = 5000), ``beta = 0.999`` (Adam's beta2) and ``warmup = 20``
    (SPAM's N_a) reproduce SPAM's rule once ``1 - beta**t`` is close to 1. Two differences: the EMA is
    bias-corrected (SPAM uses its raw Adam v), and coordinates whose history is exactly 0 are not
    clipped (in SPAM, a coordinate with v = 0 after the warm-up, e.g. an embedding row not seen yet,
    is clipped to 0 and its v stays 0, so it never learns until the next momentum reset).
    """
    if k <= 0 or not 0.0 < beta < 1.0 or warmup < 0:
        raise ValueError(f"need k > 0, 0 < beta < 1, warmup >= 0; got {k}, {beta}, {warmup}")

    def init(params: list[Tensor]) -> PerCoordinateClipState:
        dev = _device(params)
        nu = tuple(torch.zeros_like(p, dtype=_wide(p.dtype)) for p in params)
        return PerCoordinateClipState(_counter(dev), _counter(dev), _counter(dev), nu)

    def update(grads, state: PerCoordinateClipState, params):
        t = state.count
        active = t >= warmup
        tf = t.to(torch.float64)
        bias = torch.where(t > 0, 1.0 - torch.pow(beta, tf), 1.0)
        out, nus, hits = [], [], []
        for g, nu in zip(grads, state.nu, strict=True):
            nu_hat = nu / bias.to(nu.dtype)
            limit = k * torch.sqrt(nu_hat)
            gw = g.to(nu.dtype)
            mask = active & (nu_hat > 0) & (gw.abs() > limit)
            gw = torch.where(mask, torch.sign(gw) * limit, gw)
            out.append(gw.to(g.dtype))
            nus.append(torch.where(torch.isfinite(gw), beta * nu + (1.0 - beta) * gw * gw, nu))
            hits.append(mask.sum())
        n_hit = torch.stack(hits).sum() if hits else _counter(t.device)
        new = PerCoordinateClipState(t + 1, state.clipped + (n_hit > 0).long(), n_hit, tuple(nus))
        return out, new

    return GradientTransform(init, update, name)


def adaptive_gradient_clipping(
    clip: float = 0.01, eps: float = 1e-3, exclude: Iterable[Tensor] = (), *, name: str = "adaptive_gradient_clipping"
) -> GradientTransform:
    """Unit-wise adaptive gradient clipping (AGC), Brock et al. 2021, NFNets (arXiv 2102.06171, eq. 3).

    For each unit i, ``G_i <- clip * ||W_i||* / ||G_i|| * G_i`` if ``||G_i|| / ||W_i||* > clip``, where
    ``||W_i||* = max(||W_i||, eps)``. A unit is an output row: for a weight of shape ``(out, ...)`` the
    norms are taken over all dims but the first; for 0-d and 1-d parameters (biases, gains) the unit is
    the whole tensor (as in the NFNets code). The paper does not clip the final classifier layer:
    pass its parameters in ``exclude`` (compared by identity). Defaults: the paper's eps 1e-3 and
    clip 0.01 (its value for large batches; it uses larger values for smaller batches).
    """
    if clip <= 0 or eps <= 0:
        raise ValueError(f"need clip > 0 and eps > 0, got {clip}, {eps}")
    skip = frozenset(id(p) for p in exclude)

    def init(params: list[Tensor]) -> AGCState:
        dev = _device(params)
        return AGCState(_counter(dev), _counter(dev), _counter(dev))

    def update(grads, state: AGCState, params):
        out, hits = [], []
        for g, p in zip(grads, params, strict=True):
            if id(p) in skip:
                out.append(g)
                continue
            dtype = _wide(g.dtype)
            dims = tuple(range(1, g.dim())) if g.dim() > 1 else None
            keep = g.dim() > 1
            w_norm = torch.linalg.vector_norm(p.detach(), dim=dims, keepdim=keep, dtype=dtype).clamp_min(eps)
            g_norm = torch.linalg.vector_norm(g, dim=dims, keepdim=keep, dtype=dtype)
            max_norm = clip * w_norm
            trigger = g_norm > max_norm
            scale = torch.where(trigger, max_norm / torch.where(trigger, g_norm, 1.0), 1.0)
            out.append((g.to(dtype) * scale).to(g.dtype))
            hits.append(trigger.sum())
        n_hit = torch.stack(hits).sum() if hits else _counter(state.count.device)
        return out, AGCState(state.count + 1, state.clipped + (n_hit > 0).long(), n_hit)

    return GradientTransform(init, update, name)


def zscore_norm_clip(
    window: int = 100, z: float = 6.0, min_history: int | None = None, record_clipped: bool = False,
    *, name: str = "zscore_norm_clip",
) -> GradientTransform:
    """Clip the global grad norm to ``mean + z * std`` of the recent accepted norms.

    ``mean`` and ``std`` (unbiased) are over the last ``window`` accepted norms, excluding the current
    one; the rule is active once ``min_history`` norms (default ``window // 2``) were accepted. If
    ``norm > mean + z * std`` all gradients are scaled by ``(mean + z * std) / norm``.

    A clipped norm is **not** added to the history (with ``record_clipped=True`` the threshold it was
    clipped to is added instead), and a non-finite norm is never added. This is the z-score
    outlier rule of llm.c (``llmc/outlier_detector.h``, karpathy/llm.c @ f1e2ace6, window 128, used
    to skip updates) and OLMo-core (``SkipStepOptimizer.get_step_factor`` in
    ``src/olmo_core/optim/skip_step_optimizer.py``, allenai/OLMo-core @ fa6c5014: 6 std over the last
    128 values, active after 64, used to skip updates), acting as a clip. Both peers keep a detected
    spike in their history afterwards (llm.c even includes it in its own statistics): a x1000 spike
    then inflates the std for the next ``window`` steps, so the detector goes blind right after a
    spike, when a second one is most likely. Keeping outliers out avoids that; the price is that a
    genuine upward shift of the norm is clipped until the history catches up (``record_clipped=True``
    lets it catch up gradually). With a constant history (std = 0) every norm above the mean is clipped.
    """
    if window < 2 or z < 0:
        raise ValueError(f"need window >= 2 and z >= 0, got {window}, {z}")
    need = window // 2 if min_history is None else min_history
    if not 2 <= need <= window:
        raise ValueError(f"min_history must be in [2, window], got {need}")

    def init(params: list[Tensor]) -> ZScoreClipState:
        dev, dtype = _device(params), _acc_dtype(params)
        return ZScoreClipState(
            _counter(dev), _counter(dev), torch.zeros(window, dtype=dtype, device=dev), _counter(dev), _counter(dev),
            torch.full((), math.inf, dtype=dtype, device=dev),
        )

    def update(grads, state: ZScoreClipState, params):
        h = state.history
        norm = global_norm(grads).to(h.dtype)
        idx = torch.arange(window, device=h.device)
        valid = idx < state.filled
        n = state.filled.to(h.dtype)
        mean = torch.where(valid, h, 0.0).sum() / n.clamp_min(1.0)
        var = torch.where(valid, (h - mean) ** 2, 0.0).sum() / (n - 1.0).clamp_min(1.0)
        active = state.filled >= need
        thr = torch.where(active, mean + z * torch.sqrt(var), math.inf)
        outlier = norm > thr  # False for a NaN norm
        scale = torch.where(outlier, thr / torch.where(outlier, norm, 1.0), 1.0)
        out = [g * scale.to(g.dtype) for g in grads]
        finite = torch.isfinite(norm)
        record = finite if record_clipped else finite & ~outlier
        value = torch.where(outlier, thr, norm)
        history = torch.where((idx == state.pos) & record, value, h)
        pos = torch.where(record, (state.pos + 1) % window, state.pos)
        filled = torch.where(record, (state.filled + 1).clamp_max(window), state.filled)
        new = ZScoreClipState(state.count + 1, state.clipped + outlier.long(), history, filled, pos, thr)
        return out, new

    return GradientTransform(init, update, name)


def skip_if_nonfinite(*, name: str = "skip_if_nonfinite") -> GradientTransform:
    """If any gradient has a NaN or Inf, replace **all** gradients by zeros and raise a flag.

    ``state.last_skipped`` (0-d bool) says whether the latest update was zeroed and ``state.skipped``
    counts them; the decision stays on the device. Zero gradients are not a skipped step for every
    optimizer: SGD with momentum still applies its buffer, Adam(W) still decays its moments
    (m <- beta1 m, v <- beta2 v), advances its step counter and applies weight decay, so the
    parameters still move. For a true skip (no update, no state change) use seismo's Guard
    (``seismo.mitigate.guard.Guard``). Put this transform first in a chain: it also keeps NaNs out of
    the histories of the transforms after it. The same non-finite check is what ``torch.amp.GradScaler`` does
    before skipping ``optimizer.step()`` (Micikevicius et al. 2018, arXiv 1710.03740).
    """

    def init(params: list[Tensor]) -> SkipNonFiniteState:
        dev = _device(params)
        return SkipNonFiniteState(_counter(dev), _counter(dev), torch.zeros((), dtype=torch.bool, device=dev))

    def update(grads, state: SkipNonFiniteState, params):
        finite = ~_any([~torch.isfinite(g).all() for g in grads], state.count.device)
        out = [torch.where(finite, g, 0.0) for g in grads]
        bad = ~finite
        return out, SkipNonFiniteState(state.count + 1, state.skipped + bad.long(), bad)

    return GradientTransform(init, update, name)


def orthogonalize(eps: float = 1e-30, *, name: str = "orthogonalize") -> GradientTransform:
    """Perpendicular gradient (perp-Grad), Prieto et al. 2025 (arXiv 2501.04697), per parameter tensor.

    With w and g the flattened weight and gradient:
    ``g_perp = g - (w.g) / (w.w + eps) * w``, then ``g_perp <- g_perp * ||g|| / (||g_perp|| + eps)``,
    so the update cannot scale the weights along their own direction (the "naive loss minimization"
    direction that leads to Softmax Collapse) and the gradient norm is unchanged. Computed in
    float32 (float64 for float64 tensors). As in the paper's ``orthograd.py``, a gradient exactly
    parallel to w (e.g. any 1-element parameter) leaves only rounding noise in g_perp, which the
    rescaling blows up to ``||g||``: exclude such parameters (pytorch-optimizer's ``OrthoGrad``
    zeroes that case instead).
    """

    def init(params: list[Tensor]) -> OrthogonalizeState:
        return OrthogonalizeState(_counter(_device(params)))

    def update(grads, state: OrthogonalizeState, params):
        out = []
        for g, p in zip(grads, params, strict=True):
            dtype = _wide(g.dtype)
            w = p.detach().reshape(-1).to(dtype)
            gf = g.reshape(-1).to(dtype)
            proj = torch.dot(w, gf) / (torch.dot(w, w) + eps)
            perp = gf - proj * w
            perp = perp * (torch.linalg.vector_norm(gf) / (torch.linalg.vector_norm(perp) + eps))
            out.append(perp.reshape(g.shape).to(g.dtype))
        return out, OrthogonalizeState(state.count + 1)

    return GradientTransform(init, update, name)


def measure(name: str = "grad_norm") -> GradientTransform:
    """Record the global L2 norm of the gradients at this position of a chain; gradients pass unchanged.

    ``chain(measure("pre"), clip_by_global_norm(1.0), measure("post"))`` records the norm before and
    after clipping on the same step (optax's idea of a monitor inside the chain). Read it with
    :func:`measured`; nothing is synced until you read it.
    """
    if not name:
        raise ValueError("measure needs a non-empty name")

    def init(params: list[Tensor]) -> MeasureState:
        dev = _device(params)
        return MeasureState(_counter(dev), torch.zeros((), dtype=_acc_dtype(params), device=dev))

    def update(grads, state: MeasureState, params):
        return grads, MeasureState(state.count + 1, global_norm(grads).to(state.norm.dtype))

    return GradientTransform(init, update, name)


def adagc(
    lambda_rel: float = 1.05, beta: float = 0.98, warmup: int = 100, lambda_abs: float = 1.0, eps: float = 1e-8,
    *, name: str = "adagc",
) -> GradientTransform:
    """AdaGC: per-tensor adaptive gradient clipping against an EMA of the tensor's own clipped norm.

    Wang et al. 2025, "AdaGC: Improving Training Stability for Large Language Model Pretraining"
    (arXiv 2502.11034, Algorithm 1). For each parameter tensor i at update t (t = updates seen):

    * warm-up (``t < warmup``): global-norm clipping to ``lambda_abs``,
      ``g_hat_i = min(1, lambda_abs / (||g|| + eps)) g_i`` (``||g||`` the global norm), and
      ``gamma_i <- min(gamma_i, ||g_hat_i||)`` (``gamma_i = ||g_hat_1||`` at the first update);
    * afterwards: ``h_i = min(1, lambda_rel * max(gamma_i, eps) / max(||g_i||, eps))``,
      ``g_hat_i = h_i g_i`` and ``gamma_i <- beta gamma_i + (1 - beta) ||g_hat_i||``.

    Defaults are the paper's (lambda_rel 1.05, beta 0.98, T_start 100, lambda_abs 1.0). The same rule
    as pytorch-optimizer's ``AdaGC`` optimizer (which fuses it into Adam); here it is a transform for
    any optimizer. A non-finite norm leaves ``gamma_i`` unchanged.
    """
    if lambda_rel <= 0 or lambda_abs <= 0 or not 0.0 <= beta < 1.0 or warmup < 0 or eps <= 0:
        raise ValueError(f"need lambda_rel > 0, lambda_abs > 0, 0 <= beta < 1, warmup >= 0, eps > 0; got "
                         f"{lambda_rel}, {lambda_abs}, {beta}, {warmup}, {eps}")

    def init(params: list[Tensor]) -> AdaGCState:
        dev = _device(params)
        gamma = tuple(torch.zeros((), dtype=_wide(p.dtype), device=p.device) for p in params)
        return AdaGCState(_counter(dev), _counter(dev), _counter(dev), gamma)

    def update(grads, state: AdaGCState, params):
        t = state.count
        warming = t < warmup
        gnorm = global_norm(grads)
        warm_scale = torch.clamp(lambda_abs / (gnorm + eps), max=1.0)
        out, gammas, hits = [], [], []
        for g, gamma in zip(grads, state.gamma, strict=True):
            dtype = gamma.dtype
            n = torch.linalg.vector_norm(g, dtype=dtype)
            rel = torch.clamp(lambda_rel * gamma.clamp_min(eps) / n.clamp_min(eps), max=1.0)
            h = torch.where(warming, warm_scale.to(dtype), rel)
            g_hat = (g.to(dtype) * h).to(g.dtype)
            n_hat = n * h
            new_gamma = torch.where(warming, torch.where(t == 0, n_hat, torch.minimum(gamma, n_hat)),
                                    beta * gamma + (1.0 - beta) * n_hat)
            gammas.append(torch.where(torch.isfinite(n_hat), new_gamma, gamma))
            out.append(g_hat)
            hits.append(h < 1.0)
        n_hit = torch.stack(hits).sum() if hits else _counter(t.device)
        return out, AdaGCState(t + 1, state.clipped + (n_hit > 0).long(), n_hit, tuple(gammas))

    return GradientTransform(init, update, name)


def zclip(
    alpha: float = 0.97, z_thresh: float = 2.5, warmup: int = 25, eps: float = 1e-6, max_norm: float | None = None,
    *, name: str = "zclip",
) -> GradientTransform:
    """ZClip: clip the global grad norm when its z-score against EMA statistics exceeds ``z_thresh``.

    Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training" (arXiv 2504.02507),
    following the official code (bluorion-com/ZClip ``zclip/zclip.py``, mode ``zscore``,
    clip_option ``adaptive_scaling``):

    * warm-up: the first ``warmup`` (25) finite norms are collected, not clipped by ZClip; then
      ``mean`` and ``var`` (population variance) of those norms start the EMAs;
    * afterwards, with ``std = sqrt(var)`` and ``z = (norm - mean) / (std + eps)``: if ``z > z_thresh``
      the norm is clipped to ``mean + z_thresh * std / (z / z_thresh)`` (a larger outlier is clipped
      harder), gradients scaled by ``threshold / (norm + 1e-6)``;
    * the EMAs are updated with the clipped norm (the norm itself if not clipped):
      ``mean <- alpha mean + (1 - alpha) x`` then ``var <- alpha var + (1 - alpha) (x - mean)^2`` with
      the *new* mean, as in the official code; a non-finite norm updates nothing.

    ``max_norm``: an optional fixed cap on top (the official code's ``max_grad_norm``, default 1.0
    there and also applied during warm-up); seismo defaults to None so that ZClip composes with
    :func:`clip_by_global_norm` in a :func:`chain`.
    """
    if not 0.0 < alpha < 1.0 or z_thresh <= 0 or warmup < 1 or eps <= 0 or (max_norm is not None and max_norm <= 0):
        raise ValueError(f"need 0 < alpha < 1, z_thresh > 0, warmup >= 1, eps > 0, max_norm > 0 or None; got "
                         f"{alpha}, {z_thresh}, {warmup}, {eps}, {max_norm}")
    cap = math.inf if max_norm is None else float(max_norm)

    def init(params: list[Tensor]) -> ZClipState:
        dev, dtype = _device(params), _acc_dtype(params)
        zero = torch.zeros((), dtype=dtype, device=dev)
        return ZClipState(_counter(dev), _counter(dev), torch.zeros(warmup, dtype=dtype, device=dev), _counter(dev),
                          zero, zero.clone(), torch.full((), math.inf, dtype=dtype, device=dev))

    def update(grads, state: ZClipState, params):
        w = state.warm
        norm = global_norm(grads).to(w.dtype)
        finite = torch.isfinite(norm)
        ready = state.filled >= warmup
        std = torch.sqrt(state.var)
        z = (norm - state.mean) / (std + eps)
        spike = ready & finite & (z > z_thresh)
        adaptive = state.mean + z_thresh * std / torch.where(spike, z / z_thresh, 1.0)
        thr = torch.minimum(torch.where(spike, adaptive, norm), torch.full_like(norm, cap))
        outlier = finite & (norm > thr)
        scale = torch.where(outlier, thr / (norm + 1e-6), 1.0)
        out = [g * scale.to(g.dtype) for g in grads]
        # warm-up: collect; on the step that fills the buffer, start the EMAs from it
        idx = torch.arange(warmup, device=w.device)
        collect = ~ready & finite
        warm = torch.where((idx == state.filled) & collect, norm, w)
        filled = state.filled + collect.long()
        done_now = collect & (filled >= warmup)
        w_mean = warm.mean()
        w_var = ((warm - w_mean) ** 2).mean()
        x = torch.where(spike, adaptive, norm)  # the official EMA input: the adaptive clip value, or the norm
        ema_mean = alpha * state.mean + (1.0 - alpha) * x
        ema_var = alpha * state.var + (1.0 - alpha) * (x - ema_mean) ** 2
        upd = ready & finite
        mean = torch.where(done_now, w_mean, torch.where(upd, ema_mean, state.mean))
        var = torch.where(done_now, w_var, torch.where(upd, ema_var, state.var))
        threshold = torch.where(outlier, thr, math.inf)
        return out, ZClipState(state.count + 1, state.clipped + outlier.long(), warm, filled, mean, var, threshold)

    return GradientTransform(init, update, name)


#: Every transform factory, by name; each can be called with no arguments (the contract test does).
REGISTRY: types.MappingProxyType = types.MappingProxyType({
    "clip_by_global_norm": clip_by_global_norm,
    "clip_by_value": clip_by_value,
    "clip_per_coordinate": clip_per_coordinate,
    "adaptive_gradient_clipping": adaptive_gradient_clipping,
    "zscore_norm_clip": zscore_norm_clip,
    "skip_if_nonfinite": skip_if_nonfinite,
    "orthogonalize": orthogonalize,
    "measure": measure,
    "adagc": adagc,
    "zclip": zclip,
})


# ---------------------------------------------------------------------------------------------
# State <-> plain containers (so torch.load(weights_only=True) can read a checkpoint)


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def _pack(state: Any) -> Any:
    if isinstance(state, Tensor):
        return state
    if _is_namedtuple(state):
        return {f: _pack(getattr(state, f)) for f in state._fields}
    if isinstance(state, (list, tuple)):
        return [_pack(s) for s in state]
    return state


def _unpack(template: Any, packed: Any, path: str) -> Any:
    if isinstance(template, Tensor):
        if not isinstance(packed, Tensor) or packed.shape != template.shape:
            got = tuple(packed.shape) if isinstance(packed, Tensor) else type(packed).__name__
            raise ValueError(f"transform state {path}: expected a tensor of shape {tuple(template.shape)}, got {got}")
        return packed.to(device=template.device, dtype=template.dtype, copy=True)
    if _is_namedtuple(template):
        if not isinstance(packed, dict) or set(packed) != set(template._fields):
            raise ValueError(f"transform state {path}: expected fields {template._fields}, got {packed!r:.200}")
        return type(template)(*(_unpack(getattr(template, f), packed[f], f"{path}.{f}") for f in template._fields))
    if isinstance(template, (list, tuple)):
        if not isinstance(packed, (list, tuple)) or len(packed) != len(template):
            raise ValueError(f"transform state {path}: expected {len(template)} entries")
        return type(template)(_unpack(t, p, f"{path}[{i}]") for i, (t, p) in enumerate(zip(template, packed)))
    return packed


# ---------------------------------------------------------------------------------------------
# attach


def _params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class TransformHandle:
    """What :func:`attach` returns: the live transform state, and ``remove()`` to detach.

    ``state`` is the transform state after the latest ``optimizer.step()``; ``key`` is the name the
    state is saved under in ``optimizer.state_dict()[STATE_DICT_KEY]``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, tx: GradientTransform, key: str):
        self.optimizer = optimizer
        self.tx = tx
        self.key = key
        self._nparams = len(_params(optimizer))
        with torch.no_grad():
            self.state = tx.init(_params(optimizer))
        self._hooks = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_state_dict_post_hook(self._save),
            optimizer.register_load_state_dict_pre_hook(self._load),
        ]

    def _pre_step(self, optimizer, args, kwargs) -> None:
        params = _params(optimizer)
        if len(params) != self._nparams:
            raise RuntimeError(
                f"transform {self.key!r} was attached to {self._nparams} parameters, the optimizer now has "
                f"{len(params)}; attach after add_param_group()"
            )
        grads = []
        for p in params:
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError("gradient transforms do not support sparse gradients")
            grads.append(p.grad if p.grad is not None else torch.zeros_like(p))
        with torch.no_grad():
            new, self.state = self.tx.update(grads, self.state, params)
            for p, g in zip(params, new, strict=True):
                if p.grad is not None and g is not p.grad:
                    p.grad.copy_(g)

    def _save(self, optimizer, state_dict: dict) -> dict:
        saved = dict(state_dict.get(STATE_DICT_KEY, {}))
        saved[self.key] = _pack(self.state)
        state_dict[STATE_DICT_KEY] = saved
        return state_dict

    def _load(self, optimizer, state_dict: dict) -> None:
        packed = state_dict.get(STATE_DICT_KEY, {}).get(self.key)
        if packed is None:
            warnings.warn(
                f"optimizer state dict has no state for transform {self.key!r}; keeping the current one",
                stacklevel=3,
            )
            return
        self.state = _unpack(self.state, packed, self.key)

    def remove(self) -> None:
        """Detach: the optimizer steps on raw gradients again and stops saving this state."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        handles = getattr(self.optimizer, _HANDLES_ATTR, {})
        if handles.get(self.key) is self:
            del handles[self.key]


def attach(optimizer: torch.optim.Optimizer, tx: GradientTransform, *, key: str = "transforms") -> TransformHandle:
    """Run ``tx`` on the gradients right before every ``optimizer.step()``; returns a handle.

    The optimizer class is unchanged: a step pre-hook replaces each ``p.grad`` in place by the
    transformed gradient (parameters whose ``.grad`` is None are given zeros for the computation,
    so they add nothing to global norms, and keep ``.grad = None``). The transform sees every
    parameter of every param group, in order. ``optimizer.state_dict()`` then carries the transform
    state under ``state_dict[STATE_DICT_KEY][key]`` as plain dicts/lists of tensors (readable with
    ``torch.load(weights_only=True)``), and ``optimizer.load_state_dict()`` restores it: attach
    *before* loading a checkpoint. Several transforms can be attached under different keys; they
    run in attach order. With ``torch.amp.GradScaler``, ``scaler.step`` unscales before stepping and
    skips ``optimizer.step()`` (and so the transform) on overflow.
    """
    handles = optimizer.__dict__.setdefault(_HANDLES_ATTR, {})
    if key in handles:
        raise ValueError(f"a transform is already attached under key {key!r}; remove it or pick another key")
    handle = TransformHandle(optimizer, tx, key)
    handles[key] = handle
    return handle


def _find(tx: GradientTransform, state: Any, name: str) -> list[Any]:
    found = [state] if tx.name == name else []
    if tx.parts:
        for t, s in zip(tx.parts, state.inner):
            found += _find(t, s, name)
    return found


def state_of(optimizer_or_handle: torch.optim.Optimizer | TransformHandle, name: str) -> Any:
    """The latest state of the attached transform named ``name`` (e.g. ``"skip_if_nonfinite"``)."""
    if isinstance(optimizer_or_handle, TransformHandle):
        handles = [optimizer_or_handle]
    else:
        handles = list(getattr(optimizer_or_handle, _HANDLES_ATTR, {}).values())
    found = [s for h in handles for s in _find(h.tx, h.state, name)]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise KeyError(f"{what} attached transform named {name!r}; give transforms unique names")
    return found[0]


def measured(optimizer_or_handle: torch.optim.Optimizer | TransformHandle, name: str) -> Tensor:
    """The 0-d norm recorded by ``measure(name)`` on the latest step (0 before the first step)."""
    state = state_of(optimizer_or_handle, name)
    if not isinstance(state, MeasureState):
        raise KeyError(f"transform {name!r} is not a measure()")
    return state.norm
