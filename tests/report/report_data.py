"""Synthetic runs and sweeps written into a real run store, with known values to check against."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from seismo.store import RunStore

XSS = "<script>alert(1)</script>"
STEPS = np.arange(0, 60)


def signals(steps: np.ndarray = STEPS, growth: float = 0.08) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A run whose attention logits grow exponentially in layer 1 and stay flat in layer 0."""
    s = steps.astype(np.int64)
    t = s.astype(np.float64)
    return {
        "loss": (s, 5.0 - 2.0 * (1 - np.exp(-t / 20))),
        "val/loss": (s[::20], 5.1 - 2.0 * (1 - np.exp(-t[::20] / 20))),
        "grad/norm": (s, 1.0 + 0.5 * np.sin(t / 3) ** 2),
        "attn/logit_max/h.0.attn": (s, np.full(len(s), 8.0)),
        "attn/logit_max/h.1.attn": (s, 2.0 * np.exp(growth * t)),
        "attn/entropy_min/h.0.attn": (s, np.full(len(s), 2.5)),
        "attn/entropy_min/h.1.attn": (s, 2.5 * np.exp(-t / 30)),
        "logits/logz_mean": (s, 0.1 * t),
        "logits/logz_absmax": (s, 0.2 * t),
        "adam/update_grad_cos": (s[::10], np.linspace(0.5, 0.1, len(s[::10]))),
        "adam/ratio_std/h.0": (s[::10], np.full(len(s[::10]), 0.2)),
        "adam/ratio_std/h.1": (s[::10], np.linspace(0.2, 0.9, len(s[::10]))),
        "adam/eps_dominated/h.0": (s[::10], np.full(len(s[::10]), 0.01)),
        "hessian/max_eig": (s[::20], np.array([10.0, 200.0, 400.0])),
        "hessian/threshold": (s[::20], np.full(3, 380.0)),
    }


EVENTS = [
    {"step": 30, "kind": "attention_logit_growth", "severity": "warning", "module": "h.1.attn",
     "message": "max attention logit <img src=x onerror=alert(2)> growing", "evidence": {"value": 22.0, "threshold": 1000.0},
     "advice": "qk-layernorm"},
    {"step": 50, "kind": "attention_logit_growth", "severity": "critical", "module": "h.1.attn",
     "message": "max attention logit reached 1e3", "evidence": {"value": 1090.0}, "advice": "qk-layernorm"},
]


def write_run(store_path: Path, name: str, metrics: dict, events: list[dict] = (), config: dict | None = None,
              meta: dict | None = None, status: str = "completed") -> int:
    rows = [(int(st), n, float(v)) for n, (ss, vs) in metrics.items() for st, v in zip(ss, vs)]
    with RunStore(store_path) as store:
        return store.record_run(name, config=config or {}, meta=meta or {}, status=status, metrics=rows, events=list(events))


# A sweep stored the way seismo.proxy.sweep stores it (meta keys), with losses we choose.
SWEEP_LRS = [1e-3, 1e-2, 1e-1]
SWEEP_SIZES = {"s": 1e4, "m": 4e4}
INIT_LOSS = 5.5


def sweep_loss(iv: str, size: str, lr: float) -> tuple[float, str]:
    """(final val loss, status): the baseline diverges at lr 0.1; qk_norm never does."""
    if iv == "baseline" and lr == 1e-1:
        return math.nan, "diverged"
    base = {1e-3: 3.0, 1e-2: 2.5, 1e-1: 2.8}[lr]
    return base - (0.2 if size == "m" else 0.0) - (0.1 if iv == "qk_norm" else 0.0), "completed"


def attn_logit(iv: str, size: str, lr: float) -> float:
    """Max attention logit = 3 * lr * sqrt(n_params) for the baseline (a power law, exponent 1/2)."""
    n = SWEEP_SIZES[size]
    return 3.0 * lr * math.sqrt(n) * (1.0 if iv == "baseline" else 0.01)


def write_sweep(store_path: Path, name: str = "toy") -> None:
    for iv in ("baseline", "qk_norm"):
        for size, n in SWEEP_SIZES.items():
            for lr in SWEEP_LRS:
                loss, status = sweep_loss(iv, size, lr)
                meta = dict(sweep=name, intervention=iv, size=size, lr=lr, seed=0, n_params=n, init_loss=INIT_LOSS,
                            final_val_loss=loss, final_train_loss=loss, max_attn_logit=attn_logit(iv, size, lr),
                            trial_key=f"{iv}{size}{lr}")
                write_run(store_path, f"{name}/{iv}/{size}/lr={lr:g}/seed=0",
                          {"loss": (STEPS[:5], np.linspace(INIT_LOSS, 3.0, 5))}, meta=meta, status=status)
