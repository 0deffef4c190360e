"""What the Guard watches and what it does: :class:`GuardConfig`, validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass

from seismo.errors import ConfigError

__all__ = ["GuardConfig", "POLICIES", "SKIP_MODES"]

POLICIES = ("skip", "rollback")
SKIP_MODES = ("auto", "fused", "mask", "sync")

_INT_AT_LEAST_1 = ("window", "warmup", "max_consecutive_skips", "recovery_steps", "interval", "ring_size",
                   "disk_keep", "retry_window", "sync_every")
_INT_AT_LEAST_0 = ("disk_interval", "rewind", "skip_ahead", "max_rollbacks")
_FINITE_AT_LEAST_0 = ("loss_min_jump", "grad_min_jump", "max_grad_norm")
_BOOLS = ("watch_loss", "watch_grad_norm", "zero_grad", "restore_rng")


@dataclass
class GuardConfig:
    """What the Guard watches and what it does. Defaults follow the OLMo-core / llm.c spike rule
    (6 sigma over 128 values, spikes kept out of the window) and a scaled-down PaLM rewind
    (Chowdhery et al. 2022, arXiv 2204.02311).

    Detection (per step, on the device): a signal ``x`` (the loss, the pre-clip global gradient
    norm) is a spike when at least ``warmup`` values have been accepted and
    ``(x - median) / max(1.4826 MAD, 1e-3 |median|) > z`` **and** ``x - median > min_jump |median|``
    over the last ``window`` accepted values. A non-finite loss or gradient is always skipped.

    Every field is checked when the config is built (also by ``dataclasses.replace`` and by
    ``Guard(..., field=value)``); a bad value raises :class:`seismo.errors.ConfigError` naming it.
    """

    policy: str = "rollback"
    """``"skip"``: drop flagged steps only. ``"rollback"``: also restore a checkpoint from before a
    spike that does not recover and skip the data around it."""

    # --- detection ---
    window: int = 128
    """Accepted (loss, grad norm) values the median and MAD are taken over (>= 4)."""
    z: float = 6.0
    """Robust z-score above which a value is a spike (> 0)."""
    warmup: int = 20
    """Accepted values needed before spikes are flagged (1 .. window); non-finite values are always flagged."""
    loss_min_jump: float = 0.05
    """A loss spike must also exceed the median by this fraction of it (>= 0)."""
    grad_min_jump: float = 1.0
    """A grad-norm spike must also exceed the median by this fraction of it (>= 0)."""
    watch_loss: bool = True
    """Flag loss spikes."""
    watch_grad_norm: bool = True
    """Flag gradient-norm spikes."""

    # --- escalation: when a spike "does not recover" ---
    max_consecutive_skips: int = 5
    """This many flagged steps in a row escalate (reset the window, roll back or give up)."""
    recovery_steps: int = 20
    """A third burst of flagged steps this many steps or more after the first one escalates (a spike
    that keeps coming back; two isolated outliers never do); this many unflagged steps end a spike
    episode."""

    # --- rollback ---
    interval: int = 50
    """Steps between in-memory checkpoints."""
    ring_size: int = 4
    """In-memory checkpoints kept."""
    disk_interval: int = 200
    """Steps between on-disk snapshots: a multiple of ``interval``; 0 = never."""
    disk_keep: int = 2
    """On-disk snapshots kept."""
    rewind: int = 20
    """Restore a checkpoint at least this many steps before the spike started."""
    skip_ahead: int = 50
    """Batches skipped beyond the last one the failed trajectory saw."""
    rollback_lr_factor: float = 1.0
    """Multiply the effective LR by this at each rollback, in (0, 1]."""
    max_rollbacks: int = 3
    """Rollbacks allowed within ``retry_window`` batches; one more gives up (raises GuardGaveUp)."""
    retry_window: int = 1000
    """The span, in data batches, over which ``max_rollbacks`` is counted."""

    # --- mechanics ---
    skip_mode: str = "auto"
    """How a step is skipped: ``"fused"`` (found_inf of a fused optimizer), ``"mask"`` (snapshot and
    ``torch.where``), ``"sync"`` (decide on the host) or ``"auto"``; see docs/GUARD.md."""
    sync_every: int = 16
    """Steps between host reads of the decisions (device skip modes)."""
    max_grad_norm: float = 0.0
    """> 0: clip the gradients to this global norm, reusing the norm the Guard computed."""
    zero_grad: bool = True
    """Call ``optimizer.zero_grad(set_to_none=True)`` after every step."""
    restore_rng: bool = True
    """Checkpoints carry the torch RNG state; a rollback restores it."""

    def __post_init__(self) -> None:
        def need(ok: bool, field: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"GuardConfig.{field}: {what}, got {getattr(self, field)!r}")

        need(self.policy in POLICIES, "policy", f"must be one of {POLICIES}")
        need(self.skip_mode in SKIP_MODES, "skip_mode", f"must be one of {SKIP_MODES}")
        for f in _INT_AT_LEAST_1:
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f, "must be an integer >= 1")
        for f in _INT_AT_LEAST_0:
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f, "must be an integer >= 0")
        for f in _BOOLS:
            need(isinstance(getattr(self, f), bool), f, "must be True or False")
        need(self.window >= 4, "window", "must be >= 4")
        need(self.warmup <= self.window, "warmup", f"must be <= window ({self.window})")
        need(_is_number(self.z) and self.z > 0 and math.isfinite(self.z), "z", "must be a finite number > 0")
        for f in _FINITE_AT_LEAST_0:
            v = getattr(self, f)
            need(_is_number(v) and math.isfinite(v) and v >= 0, f, "must be a finite number >= 0")
        need(_is_number(self.rollback_lr_factor) and 0 < self.rollback_lr_factor <= 1, "rollback_lr_factor",
             "must be in (0, 1]")
        need(self.disk_interval % self.interval == 0, "disk_interval", f"must be a multiple of interval ({self.interval})")


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
