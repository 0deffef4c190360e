"""On TinyGPT at an unstable learning rate, each stabilizer reduces the signal it targets.

One chaotic training run changes with the CPU's floating-point kernels (ATEN_CPU_CAPABILITY=default,
avx2, avx512 give different runs), so every effect is asserted over several seeds: it must hold in
each seed with a wide margin, and its geometric mean over the seeds must be clearly there. The
margins come from seeds 0-4 measured under default, avx2 and avx512 kernels (worst case in the
comment of each test). Three seeds by default; the five-seed variant is marked ``slow``.

A small, fast configuration (the tiny preset); the full comparison on the demo configuration is
``bench/mitigations.py`` (results in docs/BENCHMARKS.md).
"""

import numpy as np
import pytest
import torch

from seismo.proxy.config import apply_overrides
from seismo.proxy.presets import tiny
from seismo.proxy.train import train

SEED_SETS = [pytest.param((0, 1, 2), id="3seeds"), pytest.param((0, 1, 2, 3, 4), id="5seeds", marks=pytest.mark.slow)]
CONFIGS = {  # name: (overrides, steps)
    "baseline": ((), 120),
    "qk_norm": (("model.qk_norm=true",), 120),
    "sigma_reparam": (("model.sigma_reparam=true",), 120),
    "no_warmup": (("optim.warmup_steps=0",), 120),
    # the first 40 steps of a 60-step warm-up do not depend on the run's length: 40 steps suffice
    "long_warmup": (("optim.warmup_steps=60",), 40),
    "no_z_loss": (("model.qk_norm=true", "optim.decay=constant"), 100),
    "z_loss": (("model.qk_norm=true", "optim.decay=constant", "z_loss=1e-2"), 100),
}


def hot(seed: int, *overrides: str, steps: int):
    cfg = tiny()
    apply_overrides(cfg, [f"seed={seed}", f"steps={steps}", "optim.lr=0.3", "optim.warmup_steps=10", "eval_every=0",
                          *overrides])
    return train(cfg)


def reduce(r, prefix: str, how: str, before: int | None = None) -> float:
    """max (or min) of every signal named ``prefix...`` over the run (or its steps < ``before``)."""
    vals = []
    for k, (s, v) in r.history.items():
        if k.startswith(prefix):
            keep = np.isfinite(v) & (s < before if before is not None else True)
            if keep.any():
                vals.append(getattr(np, how)(v[keep]))
    assert vals, f"no {prefix} signal recorded"
    return float(max(vals) if how == "max" else min(vals))


def geo_mean(xs) -> float:
    return float(np.exp(np.mean(np.log(xs))))


@pytest.fixture(scope="module")
def run():
    """``run(name, seed)``: the training result of one configuration, computed once per module."""
    cache: dict = {}
    old = torch.get_num_threads()
    torch.set_num_threads(1)

    def get(name: str, seed: int):
        if (name, seed) not in cache:
            overrides, steps = CONFIGS[name]
            cache[(name, seed)] = hot(seed, *overrides, steps=steps)
        return cache[(name, seed)]

    yield get
    torch.set_num_threads(old)


@pytest.mark.parametrize("seeds", SEED_SETS)
def test_qk_layernorm_bounds_attention_logits(run, seeds):
    # measured: baseline max logit 5.9e4 .. 3.2e5; with qk-layernorm 5.9 .. 170 (seed 3 on every kernel:
    # the norms' gains grow), ratio 2.1e-5 .. 1.9e-3 (geometric mean over seeds <= 1.6e-4)
    ratios = []
    for seed in seeds:
        base = reduce(run("baseline", seed), "attn/logit_max/", "max")
        qk = reduce(run("qk_norm", seed), "attn/logit_max/", "max")
        assert base > 1e3, seed  # the instability is there
        assert qk < 1e3, seed  # and with qk-layernorm it is not
        ratios.append(qk / base)
    assert max(ratios) < 0.01 and geo_mean(ratios) < 1e-3, ratios


@pytest.mark.parametrize("seeds", SEED_SETS)
def test_sigma_reparam_prevents_attention_entropy_collapse(run, seeds):
    # measured: baseline min entropy 0 in every seed (collapsed, Zhai et al. 2023, arXiv 2303.06296);
    # with sigmaReparam 0.53 .. 3.18 (seed mean >= 1.7)
    base = [reduce(run("baseline", s), "attn/entropy_min/", "min") for s in seeds]
    sigma = [reduce(run("sigma_reparam", s), "attn/entropy_min/", "min") for s in seeds]
    assert max(base) < 0.05, base
    assert min(sigma) > 0.25, sigma
    assert np.mean(sigma) > 1.0, sigma


@pytest.mark.parametrize("seeds", SEED_SETS)
def test_warmup_lowers_early_gradient_norms_and_logit_growth(run, seeds):
    # no warm-up: max grad norm / baseline's = 1.42 .. 2.76 (geometric mean over seeds >= 1.8);
    # a 60-step warm-up: max attention logit over steps < 40 / baseline's = 0.010 .. 0.26 (geo mean <= 0.06)
    # (Gilmer et al. 2022, arXiv 2110.04369). Over the whole run the logit effect is chaotic (0.05 .. 3.9).
    grad_ratio = [reduce(run("no_warmup", s), "grad/norm", "max") / reduce(run("baseline", s), "grad/norm", "max")
                  for s in seeds]
    logit_ratio = [reduce(run("long_warmup", s), "attn/logit_max/", "max", before=40)
                   / reduce(run("baseline", s), "attn/logit_max/", "max", before=40) for s in seeds]
    assert min(grad_ratio) > 1.0 and geo_mean(grad_ratio) > 1.3, grad_ratio
    assert max(logit_ratio) < 0.5 and geo_mean(logit_ratio) < 0.2, logit_ratio


@pytest.mark.parametrize("seeds", SEED_SETS)
def test_z_loss_pulls_log_z_towards_zero(run, seeds):
    # mean log Z^2 over the second half of 100 steps, z-loss 1e-2 / none: 0.067 .. 0.15.
    # (At this scale log Z stays near ln 256 = 5.5 and the default 1e-4 moves it only slightly.)
    def tail_sq(r):
        s, v = r.history["logits/logz_mean"]
        return float(np.mean(v[s >= 50] ** 2))

    ratio = [tail_sq(run("z_loss", s)) / tail_sq(run("no_z_loss", s)) for s in seeds]
    assert max(ratio) < 0.4 and geo_mean(ratio) < 0.25, ratio
