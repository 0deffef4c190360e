"""Attention sites for models that are not seismo's TinyGPT.

:func:`find_generic_sites` returns one *site* per attention module (see
:class:`seismo.monitor.attention.AttentionSite`). A site hands the attention probe pre-softmax
logits ``(b, nh, Tq, Tk)`` (float32, masked positions at ``-inf``) for the first ``max_batch``
sequences of the batch, for training forwards only (autograd enabled when the attention runs;
``no_grad`` / ``inference_mode`` evaluation passes are skipped). Nothing here changes what the model
computes: logits are computed on the side, under ``no_grad``, from detached tensors.

Three kinds of site:

* :class:`MHASite` - ``torch.nn.MultiheadAttention`` (also inside ``nn.TransformerEncoderLayer``
  / ``DecoderLayer``). A forward pre-hook (``with_kwargs=True``) sees query, key and masks and
  recomputes ``q`` and ``k`` from the module's own input projection (packed ``in_proj_weight``
  or separate ``q_proj_weight`` / ``k_proj_weight`` when ``kdim``/``vdim`` differ, ``bias_k``,
  ``add_zero_attn``), ``batch_first`` either way, ``key_padding_mask`` and ``attn_mask`` (bool:
  True = *not* allowed, float: additive, 2-D or per-head 3-D) and the ``is_causal`` hint exactly
  as ``F.multi_head_attention_forward`` uses them.
* :class:`SDPASite` - any module whose class calls ``F.scaled_dot_product_attention`` (found by
  reading the class source). On tracked steps the call is intercepted (see below) and the logits
  are recomputed from the call's own ``query``/``key`` with torch's semantics: ``scale`` (default
  ``1/sqrt(E)``), ``is_causal`` (top-left aligned ``tril`` when ``Tq != Tk``, as torch does),
  ``attn_mask`` (bool: True = attend, float: additive; broadcast like torch), and fewer key heads
  (``enable_gqa``: key head ``h // (Hq/Hk)`` serves query head ``h``, i.e. ``repeat_interleave``).
* :class:`HFAttentionSite` - Hugging Face ``transformers`` attention modules (``GPT2Attention``,
  ``LlamaAttention``, ``BertSelfAttention``, ...). Recent transformers project q/k/v (and apply
  RoPE) in the module, then call ``ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)``:

  - ``attn_implementation="sdpa"``: ``integrations/sdpa_attention.sdpa_attention_forward``
    calls ``torch.nn.functional.scaled_dot_product_attention`` by attribute lookup, with
    ``scale=module.scaling``, a bool mask (True = attend) or ``is_causal=True`` and, for GQA,
    either ``enable_gqa=True`` or ``repeat_kv``-expanded keys. The SDPA interception covers it
    exactly, with the same semantics as :class:`SDPASite`.
  - ``attn_implementation="eager"``: the model file's ``eager_attention_forward`` computes
    ``torch.matmul(q, k^T) * scaling + mask`` and calls ``nn.functional.softmax(w, dim=-1)``
    (older transformers, e.g. 4.40, do the same inline in the module). The site intercepts that
    ``softmax`` call and takes its 4-D input - the exact pre-softmax logits, with any softcap,
    ALiBi/position bias or sliding-window mask the model applied - so nothing is recomputed.
    transformers masks with ``torch.finfo(dtype).min`` instead of ``-inf``; values at or below
    half of that are turned into ``-inf`` (the same is done for float masks given to SDPA).

  The implementation is read from ``module.config._attn_implementation`` at every arm, so a
  model switched with ``set_attn_implementation`` is followed. flash-attention and flex-attention
  kernels are not observable: the site warns once and delivers nothing.

Attribution. A call to ``scaled_dot_product_attention`` / ``softmax`` is attributed to the
innermost *site* module being executed: while armed, each site module has a forward pre-hook that
pushes it on a per-thread stack and an ``always_call`` forward hook that pops it (exceptions
included). The call belongs to the module on top of the stack, and only if that site handles this
kind of call (an ``nn.MultiheadAttention`` inside a custom attention module is opaque: its
internal SDPA call is not credited to the outer module). Calls outside any site module (a loss
function's softmax, an attention op in code that no site covers) pass through untouched. Only site
modules are hooked, not every module of the model, so arming costs O(number of attention modules).

Patching ``torch.nn.functional.scaled_dot_product_attention`` (and ``softmax``) - the trade-off.
SDPA is one fused kernel: the logits never exist as a tensor the caller can see, and there is no
hook on a function. The only way to see its inputs without editing the user's model is to replace
the module attribute ``torch.nn.functional.scaled_dot_product_attention`` with a thin wrapper.
The wrapper calls the original function first with the unchanged arguments and returns its result
unchanged (outputs are bitwise identical), then - only for the thread, module and grad mode
described above - recomputes logits for the first ``max_batch`` sequences. What this costs and
where it is limited:

* It is process-global while installed: every SDPA/softmax call in the process goes through one
  extra Python frame (a few checks, then the original). It is therefore installed only while the
  attention probe is armed - from arming before a tracked step's forward to that step's collect
  after ``optimizer.step()`` - and is reference-counted across sites, restored to the original
  object when the last site is removed (``Monitor.close`` / ``collect`` / probe disabled), also
  when the forward raised. Untracked steps run with the original functions, no hooks at all.
* Only callers that look the function up at call time are seen: ``F.scaled_dot_product_attention``,
  ``torch.nn.functional.scaled_dot_product_attention`` (what transformers' sdpa path and
  ``F.multi_head_attention_forward`` do), ``nn.functional.softmax``. Code that bound the function
  earlier (``from torch.nn.functional import scaled_dot_product_attention``), calls
  ``torch._C._nn.scaled_dot_product_attention``, ``torch.softmax`` or ``Tensor.softmax``, or runs
  scripted/compiled code is not intercepted - it runs normally, the site just reports nothing.
* Under ``torch.compile`` the wrapper steps aside (``torch.compiler.is_compiling()``), but swapping
  a global that compiled code references makes dynamo re-check guards and may recompile when the
  attention probe is not tracked every step; prefer ``every(1)`` or TinyGPT-style taps there.
* If someone else replaces the same attribute while it is patched, the attribute is left as they
  set it on removal (restoring would drop their patch); the stale wrapper then only forwards.
* Threads: the module stack is per thread, so a call is only examined when it is made inside a
  site module's forward on the same thread (the training thread); calls made by other threads
  (data loading, logging, another model) only pass through the wrapper. Installing and removing
  the patch is done under a lock and reference-counted; the design targets one training thread.
* Memory/compute: the recomputed logits are ``max_batch * heads * Tq * Tk`` float32 values per
  site - the same as the probe's own statistics need. A site delivers once per arming (the first
  training forward, e.g. the first micro-batch under gradient accumulation; later calls, including
  activation-checkpoint recomputation, cost nothing), which is all the probe keeps anyway.

A failure inside a site (odd shapes, a module layout it does not know) never reaches the user's
forward: the site warns once and skips.
"""

from __future__ import annotations

import functools
import inspect
import math
import threading
import warnings
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "find_generic_sites",
    "MHASite",
    "SDPASite",
    "HFAttentionSite",
    "sdpa_logits",
    "mha_logits",
    "is_intercepting",
]

LogitsCallback = Callable[[Tensor], None]
NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------
# logits recomputation (pure functions, no hooks)
# --------------------------------------------------------------------------------------------


def _as4d(t: Tensor) -> Tensor:
    """``(..., L, X) -> (N, H, L, X)``: 2-D gets batch and head 1, 3-D is (batch, L, X)."""
    if t.dim() == 2:
        return t[None, None]
    if t.dim() == 3:
        return t[:, None]
    if t.dim() == 4:
        return t
    return t.reshape(-1, *t.shape[-3:])


def _mask_floor(dtype: torch.dtype) -> float:
    """Additive mask values at or below this are "masked" (transformers uses finfo(dtype).min)."""
    return torch.finfo(dtype).min / 2 if dtype.is_floating_point else NEG_INF


def _add_float_mask(z: Tensor, m: Tensor) -> Tensor:
    """Add a float (additive) mask; very negative entries (finfo.min-style) become -inf."""
    masked = m <= _mask_floor(m.dtype)
    z = z + torch.where(masked, torch.zeros((), dtype=torch.float32, device=m.device), m.float())
    return z.masked_fill(masked, NEG_INF)


def _finite_floor_to_inf(z: Tensor, dtype: torch.dtype) -> Tensor:
    return z.masked_fill(z <= _mask_floor(dtype), NEG_INF)


@torch.no_grad()
def sdpa_logits(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    max_batch: int = 4,
) -> Tensor | None:
    """Pre-softmax logits ``(b, H, Tq, Tk)`` that ``F.scaled_dot_product_attention`` would use.

    Follows torch's reference semantics: ``scale`` defaults to ``1/sqrt(E)``; ``is_causal`` masks
    with ``ones(Tq, Tk).tril()`` (top-left aligned); a bool ``attn_mask`` is True where attention
    is allowed, a float one is added; with fewer key heads (``enable_gqa``) key head ``h // g``
    serves query head ``h``. Only the first ``max_batch`` entries of the leading dimension are used.
    Returns None for shapes this does not understand.
    """
    del enable_gqa  # a head-count mismatch is what matters; torch itself rejects it without the flag
    if query.dim() < 2 or key.dim() < 2 or query.shape[-1] != key.shape[-1]:
        return None
    rank = query.dim()
    L, E = query.shape[-2], query.shape[-1]
    S = key.shape[-2]
    q = _as4d(query.detach())
    k = _as4d(key.detach()) if key.dim() == rank else None
    if k is None:
        return None
    b = max(1, min(max_batch, max(q.shape[0], k.shape[0])))
    q = q[:b] if q.shape[0] > 1 else q
    k = k[:b] if k.shape[0] > 1 else k
    hq, hk = q.shape[1], k.shape[1]
    if hk != hq and hk != 1 and hq != 1:
        if hq % hk:
            return None
        k = k.repeat_interleave(hq // hk, dim=1)
    s = 1.0 / math.sqrt(E) if scale is None else float(scale)
    z = torch.matmul(q.float(), k.float().transpose(-2, -1)) * s  # (b, H, L, S)
    if is_causal:
        allowed = torch.ones(L, S, dtype=torch.bool, device=z.device).tril()
        z = z.masked_fill(~allowed, NEG_INF)
    if attn_mask is not None:
        m = attn_mask.detach()
        if m.dim() > rank:
            return None
        m = m.reshape((1,) * (rank - m.dim()) + tuple(m.shape))
        if rank > 4:
            m = m.expand(*query.shape[:-1], S)
        m = _as4d(m)
        m = m[:b] if m.shape[0] > 1 else m
        if m.dtype == torch.bool:
            z = z.masked_fill(~m, NEG_INF)
        else:
            z = _add_float_mask(z, m)
    return z


def _bool_or_float_mask_mha(z: Tensor, m: Tensor) -> Tensor:
    """MultiheadAttention masks: bool True = *not* allowed, float = additive."""
    if m.dtype == torch.bool:
        return z.masked_fill(m, NEG_INF)
    return _add_float_mask(z, m)


def _pad_last(m: Tensor, n: int) -> Tensor:
    if n == 0:
        return m
    return torch.cat([m, m.new_zeros(*m.shape[:-1], n)], dim=-1)  # False / 0.0: allowed


@torch.no_grad()
def mha_logits(
    mod: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    need_weights: bool = True,
    is_causal: bool = False,
    max_batch: int = 4,
) -> Tensor:
    """Pre-softmax logits ``(b, nh, L, S)`` of ``nn.MultiheadAttention`` for these inputs,
    recomputed from the module's in-projection like ``F.multi_head_attention_forward``."""
    batched = query.dim() == 3
    if batched:
        if not mod.batch_first:
            query, key = query.transpose(0, 1), key.transpose(0, 1)
    else:
        query, key = query.unsqueeze(0), key.unsqueeze(0)
        if key_padding_mask is not None and key_padding_mask.dim() == 1:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    B, L, _ = query.shape
    S = key.shape[1]
    b = max(1, min(max_batch, B))
    E, nh = mod.embed_dim, mod.num_heads
    hd = E // nh
    bias = mod.in_proj_bias
    if mod._qkv_same_embed_dim:
        wq, wk = mod.in_proj_weight[:E], mod.in_proj_weight[E : 2 * E]
    else:
        wq, wk = mod.q_proj_weight, mod.k_proj_weight
    bq, bk = (None, None) if bias is None else (bias[:E], bias[E : 2 * E])
    q = F.linear(query[:b].detach(), wq.detach(), None if bq is None else bq.detach())
    k = F.linear(key[:b].detach(), wk.detach(), None if bk is None else bk.detach())
    extra = 0
    if mod.bias_k is not None:
        k = torch.cat([k, mod.bias_k.detach().reshape(1, 1, E).expand(b, 1, E).to(k.dtype)], dim=1)
        extra += 1
    q = q.reshape(b, L, nh, hd).transpose(1, 2)
    k = k.reshape(b, S + extra, nh, hd).transpose(1, 2)
    if mod.add_zero_attn:
        k = torch.cat([k, k.new_zeros(b, nh, 1, hd)], dim=2)
        extra += 1
    z = torch.matmul(q.float(), k.float().transpose(-2, -1)) * (1.0 / math.sqrt(hd))  # (b, nh, L, S')
    St = S + extra
    if is_causal and key_padding_mask is None and not need_weights:
        # F.multi_head_attention_forward drops attn_mask and lets SDPA apply is_causal (top-left).
        allowed = torch.ones(L, St, dtype=torch.bool, device=z.device).tril()
        return z.masked_fill(~allowed, NEG_INF)
    if attn_mask is not None:
        m = attn_mask.detach()
        if m.dim() == 2:
            m = m[None, None]
        else:  # (B * nh, L, S)
            m = m.reshape(-1, nh, L, S)[:b]
        z = _bool_or_float_mask_mha(z, _pad_last(m, extra))
    if key_padding_mask is not None:
        m = key_padding_mask.detach()[:b, None, None, :]
        z = _bool_or_float_mask_mha(z, _pad_last(m, extra))
    return z


def _softmax_logits(x: Tensor, max_batch: int) -> Tensor:
    z = x.detach()[: max(1, max_batch)].float()
    return _finite_floor_to_inf(z, x.dtype)


# --------------------------------------------------------------------------------------------
# call parsing
# --------------------------------------------------------------------------------------------

_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SOFTMAX_PARAMS = ("input", "dim", "_stacklevel", "dtype")


def _bind(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict[str, Any]:
    out = dict(zip(names, args))
    out.update(kwargs)
    return out


def _logits_of_call(kind: str, args: tuple, kwargs: dict, max_batch: int) -> Tensor | None:
    if kind == "sdpa":
        a = _bind(_SDPA_PARAMS, args, kwargs)
        q, k = a.get("query"), a.get("key")
        if not isinstance(q, Tensor) or not isinstance(k, Tensor) or not q.is_floating_point():
            return None
        return sdpa_logits(
            q, k, a.get("attn_mask"), bool(a.get("is_causal", False)), a.get("scale"),
            bool(a.get("enable_gqa", False)), max_batch,
        )
    a = _bind(_SOFTMAX_PARAMS, args, kwargs)
    x, dim = a.get("input"), a.get("dim")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 4 or dim not in (-1, 3):
        return None
    with torch.no_grad():
        return _softmax_logits(x, max_batch)


# --------------------------------------------------------------------------------------------
# per-thread module stack and the reversible function patches
# --------------------------------------------------------------------------------------------

_LOCAL = threading.local()


def _stack() -> list["_Install"]:
    st = getattr(_LOCAL, "stack", None)
    if st is None:
        st = _LOCAL.stack = []
    return st


def _compiling() -> bool:
    try:
        if torch.compiler.is_compiling():
            return True
    except Exception:
        pass
    return torch.jit.is_scripting() or torch.jit.is_tracing()


def _dispatch(kind: str, args: tuple, kwargs: dict) -> None:
    """Hand one intercepted call to the innermost site on this thread's stack (never raises)."""
    if not torch.is_grad_enabled() or _compiling():
        return
    stack = getattr(_LOCAL, "stack", None)
    if not stack or getattr(_LOCAL, "busy", False):
        return
    try:
        top = stack[-1].module
        targets = []
        for tok in reversed(stack):
            if tok.module is not top:
                break
            if tok.wants(kind):
                targets.append(tok)
        if not targets:
            return
        _LOCAL.busy = True
        try:
            for tok in targets:
                tok.done = True
                try:
                    logits = _logits_of_call(kind, args, kwargs, tok.max_batch)
                except Exception as exc:
                    tok.site._warn(exc)
                    continue
                if logits is not None:
                    tok.deliver(logits)
        finally:
            _LOCAL.busy = False
    except Exception:  # pragma: no cover - belt and braces: never raise into the forward
        pass


class _FunctionPatch:
    """Reference-counted, reversible replacement of one ``torch.nn.functional`` attribute."""

    def __init__(self, kind: str, attr: str):
        self.kind = kind
        self.attr = attr
        self._lock = threading.Lock()
        self._users = 0
        self._original: Callable | None = None
        self._wrapper: Callable | None = None

    @property
    def installed(self) -> bool:
        return self._wrapper is not None and getattr(F, self.attr, None) is self._wrapper

    def acquire(self) -> None:
        with self._lock:
            if self._users == 0:
                original = getattr(F, self.attr)
                self._original = original
                self._wrapper = self._make_wrapper(original)
                setattr(F, self.attr, self._wrapper)
            self._users += 1

    def release(self) -> None:
        with self._lock:
            if self._users == 0:
                return
            self._users -= 1
            if self._users == 0:
                if getattr(F, self.attr, None) is self._wrapper:
                    setattr(F, self.attr, self._original)
                self._wrapper = None
                self._original = None

    def _make_wrapper(self, original: Callable) -> Callable:
        patch, kind = self, self.kind

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            out = original(*args, **kwargs)
            if patch._wrapper is wrapper:  # a stale wrapper (someone patched on top) only forwards
                _dispatch(kind, args, kwargs)
            return out

        wrapper.__seismo_original__ = original  # type: ignore[attr-defined]
        return wrapper


_PATCHES = {
    "sdpa": _FunctionPatch("sdpa", "scaled_dot_product_attention"),
    "softmax": _FunctionPatch("softmax", "softmax"),
}


def is_intercepting(kind: str = "sdpa") -> bool:
    """True while seismo's wrapper replaces ``F.scaled_dot_product_attention`` (``"sdpa"``) or
    ``F.softmax`` (``"softmax"``)."""
    return _PATCHES[kind].installed


# --------------------------------------------------------------------------------------------
# sites
# --------------------------------------------------------------------------------------------


class _Install:
    """One arming of one site: its callback, subsample size and the calls it wants."""

    def __init__(self, site: "_ModuleSite", callback: LogitsCallback, max_batch: int, kinds: frozenset):
        self.site = site
        self.module = site.module
        self.callback = callback
        self.max_batch = max(1, int(max_batch))
        self.kinds = kinds
        self.active = True
        self.done = False

    def wants(self, kind: str) -> bool:
        return self.active and not self.done and kind in self.kinds

    def deliver(self, logits: Tensor) -> None:
        if not self.active:
            return
        try:
            self.callback(logits)
        except Exception as exc:  # the probe guards its callback; this is for other callers
            self.site._warn(exc)


class _Handle:
    def __init__(self, tok: _Install, hooks: list, patches: list[_FunctionPatch]):
        self._tok = tok
        self._hooks = hooks
        self._patches = patches

    def remove(self) -> None:
        self._tok.active = False
        hooks, self._hooks = self._hooks, []
        for h in hooks:
            try:
                h.remove()
            except Exception:
                pass
        patches, self._patches = self._patches, []
        for p in patches:
            p.release()
        st = getattr(_LOCAL, "stack", None)
        if st:
            st[:] = [t for t in st if t is not self._tok]


class _ModuleSite:
    """A site bound to one module; pushes itself on the per-thread stack during its forward."""

    kinds: frozenset = frozenset()

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module
        self._warned = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {type(self.module).__name__})"

    def _warn(self, exc: BaseException | str) -> None:
        if not self._warned:
            self._warned = True
            msg = exc if isinstance(exc, str) else f"cannot compute attention logits ({type(exc).__name__}: {exc}); skipped"
            warnings.warn(f"seismo: attention site '{self.name}': {msg}", RuntimeWarning, stacklevel=2)

    def _install_kinds(self) -> frozenset:
        return self.kinds

    def _on_forward(self, tok: _Install, args: tuple, kwargs: dict) -> None:
        """Called by the pre-hook of a training forward (for sites that work from the inputs)."""

    def install(self, callback: LogitsCallback, max_batch: int) -> _Handle:
        tok = _Install(self, callback, max_batch, self._install_kinds())

        def pre(module, args, kwargs):
            try:
                if not tok.active or _compiling():
                    return None
                if not tok.done and torch.is_grad_enabled():
                    _LOCAL.busy = True
                    try:
                        self._on_forward(tok, args, kwargs)
                    finally:
                        _LOCAL.busy = False
                _stack().append(tok)
            except Exception as exc:
                self._warn(exc)
            return None

        def post(module, args, output):
            try:
                st = _stack()
                for i in range(len(st) - 1, -1, -1):
                    if st[i] is tok:
                        del st[i]
                        break
            except Exception:
                pass
            return None

        hooks = []
        patches: list[_FunctionPatch] = []
        try:
            hooks.append(self.module.register_forward_pre_hook(pre, with_kwargs=True))
            hooks.append(self.module.register_forward_hook(post, always_call=True))
            for kind in sorted(tok.kinds):
                patch = _PATCHES[kind]
                patch.acquire()
                patches.append(patch)
        except BaseException:
            _Handle(tok, hooks, patches).remove()
            raise
        return _Handle(tok, hooks, patches)


class MHASite(_ModuleSite):
    """``nn.MultiheadAttention``: logits recomputed from its inputs in a forward pre-hook."""

    kinds = frozenset()  # opaque on the stack: its internal SDPA call is not anyone else's

    _PARAMS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")

    def _on_forward(self, tok: _Install, args: tuple, kwargs: dict) -> None:
        a = _bind(self._PARAMS, args, kwargs)
        query, key = a.get("query"), a.get("key")
        if not isinstance(query, Tensor) or not isinstance(key, Tensor) or query.is_nested or key.is_nested:
            return
        tok.done = True
        try:
            logits = mha_logits(
                self.module, query, key, a.get("key_padding_mask"), a.get("attn_mask"),
                bool(a.get("need_weights", True)), bool(a.get("is_causal", False)), tok.max_batch,
            )
        except Exception as exc:
            self._warn(exc)
            return
        tok.deliver(logits)


class SDPASite(_ModuleSite):
    """A module calling ``F.scaled_dot_product_attention``: its calls are intercepted on tracked
    steps and the logits recomputed from the call's query/key/mask."""

    kinds = frozenset({"sdpa"})


class HFAttentionSite(_ModuleSite):
    """A Hugging Face attention module: its SDPA call (``sdpa``) or its softmax input (``eager``)."""

    def _install_kinds(self) -> frozenset:
        config = getattr(self.module, "config", None)
        impl = getattr(config, "_attn_implementation", None)
        if not isinstance(impl, str):
            return frozenset({"sdpa", "softmax"})
        impl = impl.lower()
        if "sdpa" in impl:
            return frozenset({"sdpa"})
        if "eager" in impl:
            return frozenset({"softmax"})
        if "flash" in impl or "flex" in impl:
            self._warn(
                f"attn_implementation={impl!r} runs a fused kernel seismo cannot observe; "
                "use 'eager' or 'sdpa' to get attention signals"
            )
        return frozenset({"sdpa", "softmax"})


# --------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------

_HF_PREFIXES = ("transformers.", "transformers_modules.")
_HF_MARKERS = ("attention_interface", "ALL_ATTENTION_FUNCTIONS", "softmax", "scaled_dot_product_attention")


@functools.lru_cache(maxsize=None)
def _class_source(cls: type) -> str | None:
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return None


def _user_classes(cls: type) -> Iterable[type]:
    for c in cls.__mro__:
        if c is nn.Module or c is object:
            break
        yield c


def _mentions(cls: type, needles: tuple[str, ...], skip: tuple[str, ...] = ("torch.",)) -> bool | None:
    """Whether the source of ``cls`` or a base class mentions a needle (None: no source at all).
    Classes from modules starting with a ``skip`` prefix are not read."""
    seen_source = False
    for c in _user_classes(cls):
        if (c.__module__ or "").startswith(skip):
            continue
        src = _class_source(c)
        if src is None:
            continue
        seen_source = True
        if any(n in src for n in needles):
            return True
    return False if seen_source else None


def _is_hf_attention(mod: nn.Module) -> bool:
    hf = [c for c in _user_classes(type(mod)) if (c.__module__ or "").startswith(_HF_PREFIXES) and "Attention" in c.__name__]
    if not hf:
        return False
    found = _mentions(type(mod), _HF_MARKERS)
    return True if found is None else found


def _calls_sdpa(mod: nn.Module) -> bool:
    # Library classes are not read: torch's own modules (MultiheadAttention has its own site) and
    # transformers' (their attention modules have HFAttentionSite; PreTrainedModel & co. merely
    # mention SDPA in configuration code).
    return bool(_mentions(type(mod), ("scaled_dot_product_attention",), skip=("torch.", "transformers.")))


def find_generic_sites(model: nn.Module) -> list[_ModuleSite]:
    """Attention sites of ``model`` in module order, named by qualified module name.

    ``nn.MultiheadAttention`` -> :class:`MHASite`; Hugging Face attention modules (innermost ones
    only: ``BertAttention`` wrapping ``BertSelfAttention`` yields the latter) ->
    :class:`HFAttentionSite`; any other module whose class source calls
    ``scaled_dot_product_attention`` -> :class:`SDPASite`. A module that calls SDPA through a helper
    defined elsewhere is not found; pass ``AttentionProbe(sites=[SDPASite(name, module)])``.
    """
    named = [(name or "<root>", mod) for name, mod in model.named_modules()]
    sites: list[_ModuleSite] = []
    hf_modules: set[int] = set()
    for _, mod in named:
        if not isinstance(mod, nn.MultiheadAttention) and _is_hf_attention(mod):
            hf_modules.add(id(mod))
    # keep the innermost HF attention modules only
    outer: set[int] = set()
    for _, mod in named:
        if id(mod) in hf_modules and any(id(sub) in hf_modules for sub in mod.modules() if sub is not mod):
            outer.add(id(mod))
    for name, mod in named:
        if isinstance(mod, nn.MultiheadAttention):
            sites.append(MHASite(name, mod))
        elif id(mod) in hf_modules:
            if id(mod) not in outer:
                sites.append(HFAttentionSite(name, mod))
        elif _calls_sdpa(mod):
            sites.append(SDPASite(name, mod))
    return sites
