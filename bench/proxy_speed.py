"""Training speed of seismo's TinyGPT on CPU, against a plain nanoGPT-style baseline.

    python bench/proxy_speed.py [--steps 30] [--warmup 5] [--rounds 3] [--threads N]

Both models have the demo's sizes (d=128, 2 layers, 4 heads, T=128, B=32, vocab 256) and run
the same step: forward, cross-entropy, backward, AdamW. The baseline below is written from
scratch in this file (no seismo): GPT-2 block, fused ``F.scaled_dot_product_attention``. The two
are measured in alternating rounds in the same process; the best round of each is reported, so
a burst of load from other processes hurts both alike.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from _machine import cpu_model, loadavg

from seismo.proxy.model import GPTConfig, TinyGPT

D, L, H, T, B, V = 128, 2, 4, 128, 32, 256


# --- the baseline: a minimal nanoGPT-style decoder --------------------------------------
class RefAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.out = nn.Linear(D, D)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, H, c // H).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class RefBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = RefAttention()
        self.ff = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.ff(self.n2(x))


class RefGPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.pos = nn.Embedding(T, D)
        self.blocks = nn.Sequential(*[RefBlock() for _ in range(L)])
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, V, bias=False)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.size(1)))
        logits = self.head(self.norm(self.blocks(x)))
        return logits, F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))


# --- timing ----------------------------------------------------------------------------
def make_step(model: nn.Module):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, V, (8, B, T + 1), generator=g)
    state = {"i": 0}

    def step():
        batch = data[state["i"] % len(data)]
        state["i"] += 1
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def time_steps(step, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        loss = step()
    float(loss.detach())  # make sure the work is done
    return time.perf_counter() - t0



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps before timing")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best is reported")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    seismo_model = TinyGPT(GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=D))
    torch.manual_seed(0)
    ref_model = RefGPT()
    n_seismo = sum(p.numel() for p in seismo_model.parameters())
    n_ref = sum(p.numel() for p in ref_model.parameters())
    steps = {"seismo TinyGPT": make_step(seismo_model), "reference": make_step(ref_model)}
    for step in steps.values():
        time_steps(step, args.warmup)
    best = {k: math.inf for k in steps}
    order = list(steps)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:  # alternate who goes first
            best[name] = min(best[name], time_steps(steps[name], args.steps))

    print(f"CPU: {cpu_model()} | torch {torch.__version__} | threads {torch.get_num_threads()} | load avg {loadavg()}")
    print(f"model: d={D} L={L} H={H} T={T} B={B} V={V}; params seismo {n_seismo:,} / reference {n_ref:,}")
    print(f"fwd+bwd+AdamW, best of {args.rounds} rounds x {args.steps} steps (after {args.warmup} warm-up steps)")
    for name, secs in best.items():
        sps = args.steps / secs
        print(f"  {name:<15} {sps:7.2f} steps/s  {sps * B * T:10,.0f} tokens/s  ({1e3 / sps:6.1f} ms/step)")
    ratio = best["reference"] / best["seismo TinyGPT"]  # speed ratio = inverse time ratio
    print(f"seismo TinyGPT / reference: {ratio:.2f}x")


if __name__ == "__main__":
    main()
