"""Do the stabilizers reduce the instability signal they target? TinyGPT at the demo's unstable lr.

    python bench/mitigations.py            # demo config (d=128, 2 layers, T=128, B=32), 600 steps
    python bench/mitigations.py --quick    # tiny config, seconds
    python bench/mitigations.py --spikes-only [--quick] [--beta2 0.999 0.95]   # injected spikes only

Each row trains the same seeded model at lr 0.1 with one change and reports the signal that change
is meant to control (all measured by seismo's Monitor in the same process):

- qk-layernorm    -> max attention logit                 (Wortsman et al. 2023, arXiv 2309.14322)
- z-loss 1e-4     -> max |log Z| of the output logits     (PaLM; Wortsman et al. 2023)
- sigmaReparam    -> min-over-heads attention entropy     (Zhai et al. 2023, arXiv 2303.06296)
- warm-up 100     -> max gradient norm in the first 100 steps vs no warm-up (Gilmer et al. 2022)

Part two (``--spikes``) injects x1000 gradient spikes and compares how far each defence ends from
the spike-free AdamW run: plain AdamW, seismo.Guard (skip step), SPAM and Stable-SPAM, at beta2
0.999 (the SPAM papers') and 0.95 (seismo's default, where SPAM also runs with a matched threshold).
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


def run_spikes(quick: bool, beta2: float = 0.999) -> list[tuple]:
    """(label, final train loss, |loss - spike-free AdamW|) for x1000 spikes on four steps.

    ``beta2`` for every optimizer: 0.999 is the SPAM papers' setting, 0.95 seismo's default. At
    beta2 != 0.999 SPAM also runs with the threshold that inflates v as much as the paper's 5000
    does at 0.999 (``spam_threshold_for_beta2``)."""
    from seismo.mitigate.optimizers import spam_threshold_for_beta2

    torch.set_num_threads(2)
    cfg0 = base(quick)
    cfg0.optim.lr = 1e-2 if not quick else 3e-2
    cfg0.optim.beta2 = beta2
    n = cfg0.steps
    spikes = [n // 4, n // 4 + 1, n // 2, (3 * n) // 4]
    clean = train(cfg0)
    runs = [("AdamW", []), ("SPAM (threshold 5000)", ["optim.name=spam"])]
    if beta2 != 0.999:
        th = spam_threshold_for_beta2(beta2)
        runs.append((f"SPAM (threshold {th:.0f}, matched to beta2)", ["optim.name=spam", f"optim.spam_threshold={th}"]))
    runs += [("Stable-SPAM", ["optim.name=stable_spam"]), ("seismo.Guard (skip)", ["guard=skip"])]
    out = [("spike-free AdamW", clean.final_train_loss, 0.0)]
    for label, ov in runs:
        cfg = base(quick)
        cfg.optim.lr, cfg.optim.beta2 = cfg0.optim.lr, beta2
        apply_overrides(cfg, ov + [f"spikes.steps={spikes}", "spikes.factor=1000"])
        try:
            r = train(cfg)
        except Exception as exc:  # noqa: BLE001 - e.g. pytorch-optimizer not installed: a row says so
            out.append((label, math.nan, f"skipped: {exc}"))
            continue
        out.append((label, r.final_train_loss, abs(r.final_train_loss - clean.final_train_loss)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--spikes", action="store_true", help="also run the injected-spike comparison")
    ap.add_argument("--spikes-only", action="store_true", help="only the injected-spike comparison")
    ap.add_argument("--beta2", type=float, nargs="+", default=[0.999, 0.95], help="beta2 values for the spike comparison")
    args = ap.parse_args()
    t0 = time.time()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if not args.spikes_only:
        print("\n| mitigation | signal | baseline | with mitigation | ratio | loss baseline | loss with |")
        print("|---|---|---|---|---|---|---|")
        for name, sig, how, b, m, lower, lb, lm in run_effects(args.quick):
            ratio = m / b if b else math.nan
            ok = (m < b) if lower else (m > b)
            print(f"| {name} | {how} {sig} | {b:.4g} | {m:.4g} | {ratio:.3g}x {'(better)' if ok else '(NOT better)'} | {lb:.3f} | {lm:.3f} |")
    if args.spikes or args.spikes_only:
        for beta2 in args.beta2:
            rows = run_spikes(args.quick, beta2)
            adamw_gap = rows[1][2]
            print(f"\n| run (x1000 gradient spikes, betas 0.9/{beta2:g}) | final train loss | |loss - spike-free AdamW| | closer than AdamW? |")
            print("|---|---|---|---|")
            for label, loss, gap in rows:
                verdict = "" if isinstance(gap, str) or label.startswith(("spike-free", "AdamW")) else ("yes" if gap < adamw_gap else "**no**")
                print(f"| {label} | {loss:.4f} | {gap if isinstance(gap, str) else f'{gap:.4f}'} | {verdict} |", flush=True)
    print(f"\ntotal time {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
