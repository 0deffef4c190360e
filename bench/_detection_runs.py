"""Real runs for the detection benchmark: small TinyGPT and MLP runs that reproduce one
instability kind each (or its stabilised twin), labelled by configuration.

Each builder returns a history ``{signal: (steps, values)}`` as the Monitor records it. Runs are
cached as ``.npz`` under ``bench/.cache/detection/`` (keyed by the case name and its parameters),
so re-scoring does not retrain. Everything runs on one CPU thread.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

History = dict[str, tuple[np.ndarray, np.ndarray]]

CACHE = Path(__file__).resolve().parent / ".cache" / "detection"


@dataclass
class Case:
    """One real run. ``expect``: kinds that must fire; ``forbid``: kinds that must not (the
    negative twin's label). ``onsets``: labelled episode onsets for the spike kinds (steps).
    ``failure``: ``history -> step`` of the operational failure, for lead times."""

    name: str
    build: Callable[[], History]
    params: dict
    expect: tuple[str, ...] = ()
    forbid: tuple[str, ...] = ()
    onsets: dict[str, list[int]] = field(default_factory=dict)
    modules: dict[int, str] = field(default_factory=dict)  # grad-spike onset -> the module it was injected into
    check_visible: bool = False  # label only the injections that visibly moved the signal (see ``visible``)
    failure: Callable[[History], int | None] | None = None
    failure_what: str = ""
    note: str = ""


# --- caching ---------------------------------------------------------------------------------

def _key(case: Case) -> str:
    blob = json.dumps({"name": case.name, **case.params}, sort_keys=True, default=str)
    return f"{case.name}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def load_or_build(case: Case, rebuild: bool = False, log: Callable[[str], None] = print) -> tuple[History, float]:
    """The case's history, from the cache if present; returns (history, seconds spent building)."""
    path = CACHE / f"{_key(case)}.npz"
    if path.exists() and not rebuild:
        with np.load(path) as z:
            names = sorted({k[2:] for k in z.files if k.startswith("s:")})
            return {n: (z["s:" + n], z["v:" + n]) for n in names}, 0.0
    t0 = time.time()
    log(f"building real run {case.name} ...")
    hist = case.build()
    dt = time.time() - t0
    CACHE.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for n, (s, v) in hist.items():
        arrays["s:" + n] = np.asarray(s, dtype=np.int64)
        arrays["v:" + n] = np.asarray(v, dtype=np.float64)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    log(f"  {case.name}: {dt:.0f} s")
    return hist, dt


def _as_history(monitor_history) -> History:
    return {k: (np.asarray(s), np.asarray(v, dtype=np.float64)) for k, (s, v) in monitor_history.items()}


# --- TinyGPT through seismo.proxy.train --------------------------------------------------------

def proxy_run(preset: str, steps: int, **overrides) -> History:
    """``seismo.proxy.train`` on a preset (monitor ``default``: attention, logits, activations every
    step; update and Adam state every 10 steps); the detectors are replayed later."""
    from seismo.proxy import train
    from seismo.proxy.config import set_field
    from seismo.proxy.presets import get_preset

    cfg = get_preset(preset)
    cfg.steps, cfg.monitor, cfg.diagnose, cfg.eval_every, cfg.log_every = steps, "default", False, 0, 10
    for k, v in overrides.items():
        set_field(cfg, k, str(v))
    return _as_history(train(cfg).history)


# --- TinyGPT in a hand-written loop, with injected spikes --------------------------------------

def tiny_loop(steps: int, *, lr: float = 1e-2, eps: float = 1e-8, lr_bursts: dict[int, float] | None = None,
              grad_bursts: dict[int, tuple[str, float]] | None = None, nan_at: int | None = None, seed: int = 0,
              probes: str = "full") -> History:
    """The ``tiny`` TinyGPT (d=64, 2 layers, T=64, B=8) with AdamW and a cosine schedule (warm-up
    10 steps), monitored every step. ``lr_bursts`` {step: factor} multiplies the lr of one step
    (the loss of the next step jumps); ``grad_bursts`` {step: (module, factor)} multiplies the
    gradient of ``module``'s weight at that step (a tensor hook, so the monitor sees it and the
    optimizer uses it); ``nan_at`` writes a NaN into a weight before that step's forward pass."""
    from seismo.mitigate.schedules import lr_at
    from seismo.monitor import Monitor
    from seismo.proxy.data import DataConfig, load_dataset
    from seismo.proxy.model import GPTConfig, TinyGPT

    ds = load_dataset(DataConfig(max_bytes=400_000))
    torch.manual_seed(seed)
    model = TinyGPT(GPTConfig(vocab_size=ds.vocab_size, block_size=64, n_embd=64))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=eps, weight_decay=0.0)
    state = {"step": 0}
    params = dict(model.named_parameters())

    def hook_for(module: str):
        def scale(g):
            m, f = (grad_bursts or {}).get(state["step"], ("", 1.0))
            return g * f if m == module else g
        return scale

    for module in sorted({m for m, _ in (grad_bursts or {}).values()}):
        params[module + ".weight"].register_hook(hook_for(module))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mon = Monitor(model, opt, probes=probes, flush_every=50)
    for step in range(steps):
        state["step"] = step
        base = lr_at(step, lr, 10, steps, "cosine", 0.1 * lr)
        for g in opt.param_groups:
            g["lr"] = base * (lr_bursts or {}).get(step, 1.0)
        if nan_at is not None and step == nan_at:
            with torch.no_grad():
                model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
        x, y = ds.batch("train", seed, step, 8, 64)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mon.step(loss)
    mon.close()
    return _as_history(mon.history)


# --- full-batch GD at the edge of stability -----------------------------------------------------

def eos_mlp(lr: float, steps: int, every_n: int = 10, seed: int = 0) -> History:
    """A 16-64-64-1 tanh MLP regressing a fixed smooth target on 256 fixed points with full-batch
    GD (MSE). Progressive sharpening raises the top Hessian eigenvalue until it reaches 2/lr
    (Cohen et al. 2021, arXiv 2103.00065). Sharpness by ``CurvatureProbe`` (Lanczos, 20 HVPs)
    every ``every_n`` steps."""
    from seismo.monitor import Monitor, build_probes, every
    from seismo.monitor.curvature_probe import CurvatureProbe

    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, 16, generator=g)
    w = torch.randn(16, 1, generator=g)
    y = torch.sin(X @ w) + 0.5 * torch.cos(2 * X[:, :1])
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = lambda m: F.mse_loss(m(X), y)  # noqa: E731
    probes = build_probes("minimal") + [CurvatureProbe(loss_fn, schedule=every(every_n), iters=20)]
    mon = Monitor(model, opt, probes=probes, flush_every=50)
    for _ in range(steps):
        loss = loss_fn(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mon.step(loss)
    mon.close()
    return _as_history(mon.history)


# --- softmax collapse on modular arithmetic ----------------------------------------------------

def modular_mlp(steps: int, weight_decay: float = 0.0, lr: float = 1e-2, seed: int = 0) -> History:
    """Prieto et al. 2025 (arXiv 2501.04697): a 226-200-200-113 ReLU MLP without biases on one-hot
    (a, b) for (a + b) mod 113, 40% train split, full batch, AdamW (betas 0.9, 0.98). Without
    weight decay the logits grow after the training set is fit until float32 softmax collapses."""
    from seismo.monitor import Monitor
    from seismo.proxy.data import ModularDataset

    ds = ModularDataset(113, "add", 0.4, 0)
    x, y = ds.x["train"], ds.y["train"][:, -1]
    X = torch.cat([F.one_hot(x[:, 0], 113), F.one_hot(x[:, 1], 113)], 1).float()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(226, 200, bias=False), nn.ReLU(), nn.Linear(200, 200, bias=False), nn.ReLU(),
                          nn.Linear(200, 113, bias=False))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no attention / residual blocks in an MLP: those probes are off
        mon = Monitor(model, opt, probes="default", flush_every=50)
    for _ in range(steps):
        loss = F.cross_entropy(model(X), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mon.step(loss)
    mon.close()
    return _as_history(mon.history)


# --- failure definitions -----------------------------------------------------------------------

def visible(hist: History, signal: str, onset: int, z: float = 6.5, before: int = 30, after: int = 5) -> bool:
    """Hand-check rule for injected spikes: the signal's peak over ``after`` steps from ``onset`` is
    at least ``z`` robust sigmas (1.4826 MAD) above the median of the ``before`` steps before it.
    (On the cached runs the injected loss spikes fall in two groups, <= 4.4 and >= 8.9 sigma.)"""
    s, v = hist[signal]
    idx = int(np.searchsorted(s, onset))
    prev = v[max(0, idx - before):idx]
    med = float(np.median(prev))
    mad = 1.4826 * float(np.median(np.abs(prev - med)))
    return bool(np.max(v[idx:idx + after]) >= med + z * max(mad, 1e-12))


def first_at_or_above(hist: History, prefix: str, threshold: float) -> int | None:
    """First step at which any signal ``prefix*`` reaches ``threshold`` (absolute value)."""
    best = None
    for k, (s, v) in hist.items():
        if k.startswith(prefix):
            idx = np.nonzero(np.abs(v) >= threshold)[0]
            if len(idx):
                best = int(s[idx[0]]) if best is None else min(best, int(s[idx[0]]))
    return best


def sharpness_crossing(hist: History) -> int | None:
    s, eig = hist["hessian/max_eig"]
    _, thr = hist["hessian/threshold"]
    idx = np.nonzero(eig >= thr)[0]
    return int(s[idx[0]]) if len(idx) else None


def first_nonfinite_loss(hist: History) -> int | None:
    s, v = hist["loss"]
    idx = np.nonzero(~np.isfinite(v))[0]
    return int(s[idx[0]]) if len(idx) else None


def loss_jump_after(hist: History, start: int, factor: float = 100.0) -> int | None:
    """First step after ``start`` whose loss is ``factor`` x the running minimum: the collapse."""
    s, v = hist["loss"]
    lo = math.inf
    for st, x in zip(s, v):
        if st >= start and math.isfinite(lo) and x > factor * lo:
            return int(st)
        lo = min(lo, x)
    return None


def degradation_onset(unstable: History, stable: History, smooth: int = 20, margin: float = 0.05) -> int | None:
    """First step after which the unstable run's trailing-mean loss stays >= (1 + margin) x the
    stabilised run's (both smoothed over ``smooth`` steps, same data order)."""
    su, lu = unstable["loss"]
    ss, ls = stable["loss"]
    n = min(len(lu), len(ls))
    k = np.ones(smooth) / smooth
    mu = np.convolve(lu[:n], k, mode="full")[:n] / np.minimum(np.arange(1, n + 1), smooth) * smooth
    ms = np.convolve(ls[:n], k, mode="full")[:n] / np.minimum(np.arange(1, n + 1), smooth) * smooth
    worse = mu >= (1 + margin) * ms
    if not worse[-1]:
        return None
    bad_from = n - int(np.argmin(worse[::-1])) if not worse.all() else 0
    return int(su[bad_from])
