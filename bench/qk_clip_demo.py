"""QK-Clip (Kimi K2, arXiv 2507.20534) on the demo's unstable run: the max attention logit with and without it.

    python bench/qk_clip_demo.py [--steps 600] [--tau 100] [--seeds 0]

The ``demo_unstable`` preset (TinyGPT d=128, 2 layers, 4 heads, T=128, B=32, AdamW lr 0.1: ten times
the healthy lr) is trained twice from the same initialisation on the same batches: plainly, and with
``QKClip(model, tau)`` applied after every optimizer step, fed by the attention taps of the
training forward (no second forward, no architecture change). The training loop is the proxy's
(``lr_at`` warm-up + cosine schedule, ``build_optimizer``, the preset's gradient clipping). Printed
per run: the largest pre-softmax attention logit (signed max over heads, positions and the first 8
sequences of each batch) over the run and over its last 100 steps, how many steps exceeded tau,
and the mean training loss of the last 100 steps.
"""

from __future__ import annotations

import argparse
import time

import torch

from seismo.mitigate.qk_clip import QKClip, head_max_logits
from seismo.mitigate.schedules import lr_at
from seismo.monitor.attention import find_attention_sites
from seismo.proxy.data import load_dataset
from seismo.proxy.model import TinyGPT
from seismo.proxy.presets import get_preset
from seismo.proxy.train import build_optimizer


def run(steps: int, tau: float | None, seed: int) -> dict:
    cfg = get_preset("demo_unstable")
    cfg.steps, cfg.seed = steps, seed
    ds = load_dataset(cfg.data)
    cfg.model.vocab_size = ds.vocab_size
    torch.manual_seed(seed)
    model = TinyGPT(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    seen: list[torch.Tensor] = []
    for site in find_attention_sites(model):  # the recorder: the same logits QK-Clip reads
        site.install(lambda logits: seen.append(head_max_logits(logits).max()), 8)
    qk = None
    if tau is not None:
        qk = QKClip(model, tau=tau)
        qk.attach(find_attention_sites(model))
    per_step, losses = [], []
    t0 = time.time()
    for step in range(steps):
        lr = lr_at(step, cfg.optim.lr, cfg.optim.warmup_steps, cfg.steps, cfg.optim.decay, cfg.optim.lr * cfg.optim.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        x, y = ds.batch("train", cfg.seed, step, cfg.batch_size, cfg.model.block_size, "cpu")
        seen.clear()
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        if qk is not None:
            qk.clip()
        per_step.append(torch.stack(seen).max())
        losses.append(loss.detach())
    m = torch.stack(per_step)
    lo = torch.stack(losses)
    thr = tau if tau is not None else 100.0
    return dict(max_logit=float(m.max()), max_logit_last100=float(m[-100:].max()), steps_over_tau=int((m > thr).sum()),
                loss_last100=float(lo[-100:].nanmean()), seconds=time.time() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--tau", type=float, default=100.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    a = ap.parse_args()
    torch.set_num_threads(1)
    for seed in a.seeds:
        for label, tau in (("plain", None), (f"qk_clip tau={a.tau:g}", a.tau)):
            r = run(a.steps, tau, seed)
            print(f"seed {seed} {label:>18}: max logit {r['max_logit']:.1f} (last 100 steps {r['max_logit_last100']:.1f}), "
                  f"steps over {a.tau:g}: {r['steps_over_tau']}, loss (last 100) {r['loss_last100']:.3f}, {r['seconds']:.0f}s",
                  flush=True)


if __name__ == "__main__":
    main()
