"""TinyGPT: a nanoGPT-style decoder that reproduces transformer training instabilities on a CPU.

GPT-2 names (``wte``, ``wpe``, ``h.{i}.attn.c_attn``, ``ln_f``, ``lm_head``) so that monitors,
mitigations and users find modules by the names they already know. Every stabilizer the seed
papers study is a switch in :class:`GPTConfig`:

================== ===========================================================================
switch             paper
================== ===========================================================================
``norm``           ``pre`` (GPT-2), ``post`` (original Transformer), ``peri`` (Peri-LN, Kim et al.
                   2025, arXiv 2502.02732), ``res_post`` (Swin V2 residual post-norm, arXiv 2111.09883)
``qk_norm``        LayerNorm on q and k per head (Dehghani 2023; Wortsman 2023, arXiv 2309.14322)
``attention``      ``softmax`` or ``cosine`` (Swin V2 scaled cosine attention, scale init 10, max 100)
``output``         ``softmax`` or ``stablemax`` loss (Prieto et al. 2025, arXiv 2501.04697)
``sigma_reparam``  sigmaReparam on every linear layer (Zhai et al. 2023, arXiv 2303.06296)
``attn_softcap``   ``cap * tanh(logit / cap)`` on attention logits (Gemma 2: 50, arXiv 2408.00118);
                   runs attention explicitly instead of the fused SDPA kernel
``final_softcap``  the same on the output logits (Gemma 2: 30)
``parametrization`` ``standard`` or ``mup`` (width multiplier, per-group LRs, 1/d attention;
                   Yang et al. 2022, arXiv 2203.03466, as used by Wortsman 2023 §3.4)
================== ===========================================================================

Attention runs through fused ``scaled_dot_product_attention``. Observers (the seismo monitor)
read the pre-softmax logits through each attention's ``logit_tap``: when something is hooked on
the tap, the logits of a bounded subsample of the batch are recomputed without gradient and
passed to it; the attention output itself never changes, so observation cannot perturb training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from seismo.errors import ConfigError
from seismo.mitigate.losses import stablemax_cross_entropy
from seismo.mitigate.model_edits import (
    COSINE_SCALE_INIT,
    QKNorm,
    apply_sigma_reparam,
    cosine_attention_scale,
)
from seismo.mitigate.softcap import softcap
from seismo.monitor.attention.tap import AttentionLogitTap

__all__ = ["GPTConfig", "TinyGPT", "AttentionLogitTap", "ConfigError"]

NORMS = ("pre", "post", "peri", "res_post")
ATTENTIONS = ("softmax", "cosine")
OUTPUTS = ("softmax", "stablemax")
PARAMETRIZATIONS = ("standard", "mup")
GAMMA_INITS = ("sigma0", "one")


@dataclass
class GPTConfig:
    """Architecture of :class:`TinyGPT`. Defaults are the demo's model (d=128, 2 layers, 4 heads)."""

    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: int = 4
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = False
    norm: str = "pre"
    norm_eps: float = 1e-5
    qk_norm: bool = False
    attention: str = "softmax"
    output: str = "softmax"
    sigma_reparam: bool = False
    sigma_gamma_init: str = "sigma0"
    parametrization: str = "standard"
    mup_base_width: int = 128
    init_std: float = 0.02
    attn_softcap: float | None = None
    final_softcap: float | None = None

    def validate(self) -> None:
        def need(cond: bool, field: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"model.{field}: {msg}")

        for f in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio", "mup_base_width"):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f, f"must be a positive integer, got {v!r}")
        need(self.n_embd % self.n_head == 0, "n_embd", f"{self.n_embd} is not divisible by n_head={self.n_head}")
        need(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        need(self.norm_eps > 0, "norm_eps", f"must be > 0, got {self.norm_eps}")
        need(self.init_std > 0, "init_std", f"must be > 0, got {self.init_std}")
        need(self.norm in NORMS, "norm", f"must be one of {NORMS}, got {self.norm!r}")
        need(self.attention in ATTENTIONS, "attention", f"must be one of {ATTENTIONS}, got {self.attention!r}")
        need(self.output in OUTPUTS, "output", f"must be one of {OUTPUTS}, got {self.output!r}")
        need(self.parametrization in PARAMETRIZATIONS, "parametrization",
             f"must be one of {PARAMETRIZATIONS}, got {self.parametrization!r}")
        need(self.sigma_gamma_init in GAMMA_INITS, "sigma_gamma_init", f"must be one of {GAMMA_INITS}, got {self.sigma_gamma_init!r}")
        for f in ("attn_softcap", "final_softcap"):
            v = getattr(self, f)
            ok = v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf)
            need(ok, f, f"must be a positive number or null (off), got {v!r}")
        for f in ("bias", "tie_weights", "qk_norm", "sigma_reparam"):
            need(isinstance(getattr(self, f), bool), f, f"must be true or false, got {getattr(self, f)!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def width_mult(self) -> float:
        """muP width multiplier n_embd / mup_base_width (1.0 under standard parametrization)."""
        return self.n_embd / self.mup_base_width if self.parametrization == "mup" else 1.0

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.dropout = cfg.dropout
        hs = cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.qk_norm = QKNorm(hs, eps=cfg.norm_eps, bias=cfg.bias) if cfg.qk_norm else None
        self.cosine = cfg.attention == "cosine"
        if self.cosine:
            # Swin V2: learnable per-head log scale, init log(10), clamped at log(100).
            self.logit_scale = nn.Parameter(torch.full((cfg.n_head, 1, 1), math.log(COSINE_SCALE_INIT)))
        # muP scales attention by 1/d instead of 1/sqrt(d).
        self.scale = 1.0 / hs if cfg.parametrization == "mup" else 1.0 / math.sqrt(hs)
        self.attn_softcap = cfg.attn_softcap  # Gemma 2 soft-capping: the explicit attention path
        self.logit_tap = AttentionLogitTap()

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.qk_norm is not None:
            q, k = self.qk_norm(q, k)
        scale = self.scale
        if self.cosine:
            q = F.normalize(q, dim=-1) * cosine_attention_scale(self.logit_scale)
            k = F.normalize(k, dim=-1)
            scale = 1.0
        if self.attn_softcap is not None:
            y = self._softcapped_attention(q, k, v, scale)
        else:
            if self.logit_tap.observed():
                self._emit_logits(q, k, scale)
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, dropout_p=self.dropout if self.training else 0.0
            )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def _softcapped_attention(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """softmax(cap * tanh(q.k * scale / cap) + causal mask) v; the tap sees the capped logits (what the softmax sees)."""
        T = q.size(-2)
        att = softcap((q @ k.transpose(-2, -1)) * scale, self.attn_softcap)
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool, device=att.device).triu(1), float("-inf"))
        if self.logit_tap.observed():
            n = max(1, min(att.size(0), self.logit_tap.max_batch))
            in_training_step = torch.is_grad_enabled()
            self.logit_tap(att[:n].detach(), in_training_step)
        att = F.dropout(torch.softmax(att, dim=-1), p=self.dropout, training=self.training)
        return att @ v

    def _emit_logits(self, q: Tensor, k: Tensor, scale: float) -> None:
        in_training_step = torch.is_grad_enabled()
        with torch.no_grad():
            n = max(1, min(q.size(0), self.logit_tap.max_batch))
            qs, ks = q[:n].detach(), k[:n].detach()
            att = (qs @ ks.transpose(-2, -1)) * scale  # (n, nh, T, T)
            T = att.size(-1)
            future = torch.ones(T, T, dtype=torch.bool, device=att.device).triu(1)
            self.logit_tap(att.masked_fill(future, float("-inf")), in_training_step)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """One transformer block; ``norm`` decides where the LayerNorms sit.

    - ``pre``:      x = x + F(LN(x))
    - ``post``:     x = LN(x + F(x))
    - ``peri``:     x = x + LN_out(F(LN(x)))   (the residual stream itself is never normalised)
    - ``res_post``: x = x + LN(F(x))           (Swin V2)
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm = cfg.norm
        ln = lambda: nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)  # noqa: E731
        self.ln_1 = ln()
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = ln()
        self.mlp = MLP(cfg)
        if cfg.norm == "peri":
            self.ln_1_out = ln()
            self.ln_2_out = ln()

    def forward(self, x: Tensor) -> Tensor:
        if self.norm == "pre":
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))
        if self.norm == "post":
            x = self.ln_1(x + self.attn(x))
            return self.ln_2(x + self.mlp(x))
        if self.norm == "peri":
            x = x + self.ln_1_out(self.attn(self.ln_1(x)))
            return x + self.ln_2_out(self.mlp(self.ln_2(x)))
        x = x + self.ln_1(self.attn(x))  # res_post
        return x + self.ln_2(self.mlp(x))


class TinyGPT(nn.Module):
    """A small GPT. ``forward(idx, targets=None) -> (logits, loss)``; targets of -1 are ignored."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
                ln_f=nn.Identity() if cfg.norm == "post" else nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight
        self._init_weights()
        if cfg.sigma_reparam:
            apply_sigma_reparam(self, gamma_init=cfg.sigma_gamma_init)

    def _init_weights(self) -> None:
        cfg = self.config
        # nanoGPT's init; muP shrinks hidden-matrix std by sqrt(width_mult) so variance ~ 1/fan_in.
        hidden_std = cfg.init_std / math.sqrt(cfg.width_mult)
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear):
                std = cfg.init_std if name == "lm_head" else hidden_std
                if name.endswith("c_proj"):
                    std = std / math.sqrt(2 * cfg.n_layer)  # GPT-2 scaled residual init
                nn.init.normal_(mod.weight, mean=0.0, std=std)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, mean=0.0, std=cfg.init_std)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel() + self.transformer.wte.weight.numel()
        return n

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, V)
        if self.config.width_mult != 1.0:
            logits = logits / self.config.width_mult  # muP readout multiplier
        if self.config.final_softcap is not None:
            logits = softcap(logits, self.config.final_softcap)
        if targets is None:
            return logits, None
        flat_logits, flat_targets = logits.view(-1, logits.size(-1)), targets.reshape(-1)
        if self.config.output == "stablemax":
            loss = stablemax_cross_entropy(flat_logits, flat_targets, ignore_index=-1)
        else:
            loss = F.cross_entropy(flat_logits, flat_targets, ignore_index=-1)
        return logits, loss
