"""Do the stabilizers reduce the instability signal they target? TinyGPT at the demo's unstable lr.

    python bench/mitigations.py            # demo config (d=128, 2 layers, T=128, B=32), 600 steps
    python bench/mitigations.py --quick    # tiny config, seconds

Each row trains the same seeded model at lr 0.1 with one change and reports the signal that change
is meant to control (all measured by seismo's Monitor in the same process):

- qk-layernorm    -> max attention logit                 (Wortsman et al. 2023, arXiv 2309.14322)
- z-loss 1e-4     -> max |log Z| of the output logits     (PaLM; Wortsman et al. 2023)
- sigmaReparam    -> min-over-heads attention entropy     (Zhai et al. 2023, arXiv 2303.06296)
- warm-up 100     -> max gradient norm in the first 100 steps vs no warm-up (Gilmer et al. 2022)

Part two (``--spikes``) injects x1000 gradient spikes and compares how far each defence ends from
the spike-free run: plain AdamW, seismo.Guard (skip step), SPAM and Stable-SPAM.
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import numpy as np
import torch

from seismo.proxy.config import apply_overrides
from seismo.proxy.presets import demo_unstable, tiny
from seismo.proxy.train import train


def base(quick: bool):
    cfg = tiny() if quick else demo_unstable()
    cfg.optim.lr = 0.1 if not quick else 0.3
    cfg.eval_every = 0
    cfg.monitor = "default"
    if quick:
        cfg.steps, cfg.optim.warmup_steps = 100, 20
    return cfg


def signal(r, prefix: str, how: str, until: int | None = None) -> float:
    vals = []
    for name, (steps, v) in r.history.items():
        if name.startswith(prefix):
            keep = np.isfinite(v) & (steps < until if until is not None else True)
            if keep.any():
                vals.append(getattr(np, how)(v[keep]))
    if not vals:
        return math.nan
    return float(max(vals) if how == "max" else min(vals))


EXPERIMENTS = [
    # name, overrides, signal prefix, reduce over run, better when lower?, until-step
    ("qk-layernorm", ["model.qk_norm=true"], "attn/logit_max/", "max", True, None),
    ("z-loss 1e-4", ["z_loss=1e-4"], "logits/logz_absmax", "max", True, None),
    ("sigmaReparam", ["model.sigma_reparam=true"], "attn/entropy_min/", "min", False, None),
]


def run_effects(quick: bool) -> list[tuple]:
    rows = []
    torch.set_num_threads(2)
    ref = train(base(quick))
    for name, ov, prefix, how, lower, until in EXPERIMENTS:
        cfg = base(quick)
        apply_overrides(cfg, ov)
        r = train(cfg)
        rows.append((name, prefix + ("*" if prefix.endswith("/") else ""), how, signal(ref, prefix, how, until), signal(r, prefix, how, until), lower,
                     ref.final_train_loss, r.final_train_loss))
    # warm-up: no warm-up vs the default 100 steps (20 in quick), early gradient norms
    w = base(quick).optim.warmup_steps
    nowarm = base(quick)
    nowarm.optim.warmup_steps = 0
    r0 = train(nowarm)
    rows.append((f"warm-up {w}", "grad/norm (first 100 steps)", "max", signal(r0, "grad/norm", "max", 100),
                 signal(ref, "grad/norm", "max", 100), True, r0.final_train_loss, ref.final_train_loss))
    return rows


def run_spikes(quick: bool) -> list[tuple]:
    cfg0 = base(quick)
    cfg0.optim.lr = 1e-2 if not quick else 3e-2
    n = cfg0.steps
    spikes = [n // 4, n // 4 + 1, n // 2, (3 * n) // 4]
    out = []
    clean = train(cfg0)
    for label, ov in [("AdamW", []), ("SPAM", ["optim.name=spam"]), ("Stable-SPAM", ["optim.name=stable_spam"])]:
        cfg = base(quick)
        cfg.optim.lr = cfg0.optim.lr
        apply_overrides(cfg, ov + [f"spikes.steps={spikes}", "spikes.factor=1000"])
        try:
            r = train(cfg)
        except Exception as exc:  # e.g. pytorch-optimizer not installed
            out.append((label, math.nan, f"skipped: {exc}"))
            continue
        out.append((label, r.final_train_loss, abs(r.final_train_loss - clean.final_train_loss)))
    try:
        from seismo.proxy.train import TrainConfig  # noqa: F401
        import seismo

        if hasattr(seismo, "Guard"):
            cfg = base(quick)
            cfg.optim.lr = cfg0.optim.lr
            apply_overrides(cfg, [f"spikes.steps={spikes}", "spikes.factor=1000", "guard=skip"])
            r = train(cfg)
            out.append(("seismo.Guard (skip)", r.final_train_loss, abs(r.final_train_loss - clean.final_train_loss)))
    except Exception as exc:
        out.append(("seismo.Guard (skip)", math.nan, f"skipped: {exc}"))
    return [("spike-free AdamW", clean.final_train_loss, 0.0)] + out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--spikes", action="store_true", help="also run the injected-spike comparison")
    args = ap.parse_args()
    t0 = time.time()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("\n| mitigation | signal | baseline | with mitigation | ratio | loss baseline | loss with |")
    print("|---|---|---|---|---|---|---|")
    for name, sig, how, b, m, lower, lb, lm in run_effects(args.quick):
        ratio = m / b if b else math.nan
        ok = (m < b) if lower else (m > b)
        print(f"| {name} | {how} {sig} | {b:.4g} | {m:.4g} | {ratio:.3g}x {'(better)' if ok else '(NOT better)'} | {lb:.3f} | {lm:.3f} |")
    if args.spikes:
        print("\n| run (x1000 gradient spikes) | final train loss | |loss - spike-free| |")
        print("|---|---|---|")
        for label, loss, gap in run_spikes(args.quick):
            print(f"| {label} | {loss:.4f} | {gap if isinstance(gap, str) else f'{gap:.4f}'} |")
    print(f"\ntotal time {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
