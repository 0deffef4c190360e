"""Full-batch training of small MLPs: the two seed experiments that are not language models.

* ``task="modular"`` - grokking and Softmax Collapse (Prieto et al. 2025, "Grokking at the Edge
  of Numerical Stability", arXiv 2501.04697; official code LucasPrietoAl/grokking-at-the-edge-of-
  numerical-stability): one-hot (a, b) concatenated (2p inputs) -> (a op b) mod p, a 226-200-200-113
  ReLU MLP without biases, full batch, AdamW without weight decay. Switches: ``output="stablemax"``
  (StableMax cross-entropy in float64), ``perp_grad=True`` (the perpendicular gradient, attached to
  the unchanged optimizer with :func:`seismo.mitigate.transforms.orthogonalize`), ``dtype`` (the
  softmax precision: float64 delays Softmax Collapse).
* ``task="regression"`` - the edge of stability (Cohen et al. 2021, arXiv 2103.00065; Gilmer et al.
  2022): a tanh MLP regressing a fixed smooth target with full-batch gradient descent; the top
  Hessian eigenvalue rises (progressive sharpening) until it reaches 2/lr and then hovers there.

Every run is observed by :class:`seismo.monitor.Monitor` (loss, gradients, output logits, update
and Adam state, and the curvature probe when ``curvature_every`` > 0) with the detectors on, and
stored like any other run. :func:`train_fullbatch` returns the same :class:`RunResult` as
:func:`seismo.proxy.train`, so sweeps treat both alike.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from seismo.errors import ConfigError
from seismo.mitigate.losses import stablemax_cross_entropy
from seismo.mitigate.transforms import attach, orthogonalize
from seismo.monitor import AdamProbe, GradientProbe, LogitsProbe, LossProbe, UpdateProbe, every
from seismo.monitor.curvature_probe import CurvatureProbe
from seismo.proxy.config import from_dict, to_dict
from seismo.proxy.data import ModularDataset
from seismo.proxy.train import RunResult, close_after_exception, final_loss, first_nonfinite_step, sigterm_interrupts
from seismo.session import Monitor

__all__ = ["FullBatchConfig", "train_fullbatch", "build_mlp", "modular_tensors", "regression_tensors"]

TASKS = ("modular", "regression")
OUTPUTS = ("softmax", "stablemax")


@dataclass
class FullBatchConfig:
    """One full-batch MLP run. ``kind`` tells a sweep which trainer to call."""

    kind: str = "fullbatch"
    task: str = "modular"  # modular | regression
    # modular arithmetic (Prieto et al. 2025 defaults)
    p: int = 113
    op: str = "add"
    train_frac: float = 0.4
    split_seed: int = 0
    # regression (edge of stability)
    in_dim: int = 16
    n_points: int = 256
    # model
    hidden: list[int] = field(default_factory=lambda: [200, 200])
    activation: str = "relu"  # relu | tanh
    bias: bool = False
    output: str = "softmax"  # softmax | stablemax (modular only)
    dtype: str = "float32"  # float32 | float64: the precision of the model and its softmax
    # optimizer
    optimizer: str = "adamw"  # adamw | sgd (plain full-batch gradient descent when momentum = 0)
    lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-25
    weight_decay: float = 0.0
    momentum: float = 0.0
    perp_grad: bool = False
    # run
    steps: int = 2000
    seed: int = 0
    eval_every: int = 50
    log_every: int = 50
    monitor: str = "default"  # default | minimal | none
    curvature_every: int = 0  # steps between top-Hessian-eigenvalue probes on the full batch; 0 = off
    curvature_iters: int = 20
    diagnose: bool = True
    run_name: str = "fullbatch"
    store: str = ""
    out_dir: str = ""  # unused; kept so sweeps can clear it like TrainConfig's

    def validate(self) -> None:
        if self.kind != "fullbatch":
            raise ConfigError(f"kind: must be 'fullbatch', got {self.kind!r}")
        if self.task not in TASKS:
            raise ConfigError(f"task: must be one of {TASKS}, got {self.task!r}")
        if self.op not in ("add", "sub", "mul"):
            raise ConfigError(f"op: must be add, sub or mul, got {self.op!r}")
        if not (isinstance(self.p, int) and self.p >= 2):
            raise ConfigError(f"p: must be an integer >= 2, got {self.p!r}")
        if not 0.0 < self.train_frac < 1.0:
            raise ConfigError(f"train_frac: must be in (0, 1), got {self.train_frac}")
        if not self.hidden or any(not isinstance(h, int) or h < 1 for h in self.hidden):
            raise ConfigError(f"hidden: must be a non-empty list of positive widths, got {self.hidden!r}")
        if self.activation not in ("relu", "tanh"):
            raise ConfigError(f"activation: must be relu or tanh, got {self.activation!r}")
        if self.output not in OUTPUTS:
            raise ConfigError(f"output: must be one of {OUTPUTS}, got {self.output!r}")
        if self.output == "stablemax" and self.task != "modular":
            raise ConfigError("output: stablemax needs a classification task (task=modular)")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"dtype: must be float32 or float64, got {self.dtype!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"optimizer: must be adamw or sgd, got {self.optimizer!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr: must be a positive number, got {self.lr!r}")
        for f in ("beta1", "beta2", "momentum"):
            if not 0.0 <= getattr(self, f) < 1.0:
                raise ConfigError(f"{f}: must be in [0, 1), got {getattr(self, f)!r}")
        if self.eps < 0 or self.weight_decay < 0:
            raise ConfigError("eps and weight_decay must be >= 0")
        for f in ("steps", "log_every", "curvature_iters", "in_dim", "n_points"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{f}: must be a positive integer, got {v!r}")
        for f in ("eval_every", "curvature_every", "seed", "split_seed"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{f}: must be an integer >= 0, got {v!r}")
        if self.monitor not in ("default", "minimal", "none"):
            raise ConfigError(f"monitor: must be default, minimal or none, got {self.monitor!r}")
        if self.curvature_every and self.monitor == "none":
            raise ConfigError("curvature_every: the curvature probe runs inside the monitor; set monitor=default or minimal")

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FullBatchConfig":
        return from_dict(cls, data)


def modular_tensors(cfg: FullBatchConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train"/"val": (one-hot inputs (N, 2p), labels (N,))}, the split of the proxy's ModularDataset."""
    ds = ModularDataset(cfg.p, cfg.op, cfg.train_frac, cfg.split_seed)
    out = {}
    for split in ("train", "val"):
        x, y = ds.x[split], ds.y[split][:, -1]
        out[split] = (torch.cat([F.one_hot(x[:, 0], cfg.p), F.one_hot(x[:, 1], cfg.p)], 1).float(), y)
    return out


def regression_tensors(cfg: FullBatchConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A fixed smooth target y = sin(x.w) + 0.5 cos(2 x_0) on Gaussian inputs; train and held-out points."""
    g = torch.Generator().manual_seed(cfg.split_seed)
    x = torch.randn(2 * cfg.n_points, cfg.in_dim, generator=g)
    w = torch.randn(cfg.in_dim, 1, generator=g)
    y = torch.sin(x @ w) + 0.5 * torch.cos(2 * x[:, :1])
    return {"train": (x[: cfg.n_points], y[: cfg.n_points]), "val": (x[cfg.n_points :], y[cfg.n_points :])}


def build_mlp(cfg: FullBatchConfig, in_dim: int, out_dim: int) -> nn.Sequential:
    act = nn.ReLU if cfg.activation == "relu" else nn.Tanh
    layers: list[nn.Module] = []
    d = in_dim
    for h in cfg.hidden:
        layers += [nn.Linear(d, h, bias=cfg.bias), act()]
        d = h
    layers.append(nn.Linear(d, out_dim, bias=cfg.bias))
    return nn.Sequential(*layers)


def _loss_fn(cfg: FullBatchConfig):
    if cfg.task == "regression":
        return F.mse_loss
    if cfg.output == "stablemax":
        return stablemax_cross_entropy
    return F.cross_entropy


def train_fullbatch(cfg: FullBatchConfig) -> RunResult:
    """Train as ``cfg`` says; records go to ``cfg.store`` (if set) under ``cfg.run_name``.

    The stored status is true on every way out, as in :func:`seismo.proxy.train`: an exception
    stores ``failed`` with its one-line summary, Ctrl-C and SIGTERM store ``interrupted``."""
    cfg.validate()
    t_start = time.time()
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    data = modular_tensors(cfg) if cfg.task == "modular" else regression_tensors(cfg)
    data = {k: (x.to(dtype), y.to(dtype) if y.is_floating_point() else y) for k, (x, y) in data.items()}
    X, Y = data["train"]
    out_dim = cfg.p if cfg.task == "modular" else 1
    torch.manual_seed(cfg.seed)
    model = build_mlp(cfg, X.shape[1], out_dim).to(dtype)
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.perp_grad:
        attach(opt, orthogonalize())
    loss_fn = _loss_fn(cfg)

    meta = dict(data=dict(task=cfg.task, n_train=len(X), n_val=len(data["val"][0])),
                n_params=sum(p.numel() for p in model.parameters()), torch=torch.__version__)
    monitor = None
    if cfg.monitor != "none":
        probes = [LossProbe(), GradientProbe()]
        if cfg.monitor == "default":
            if cfg.task == "modular":
                probes.append(LogitsProbe(output=str(len(model) - 1), max_rows=len(X)))
            probes += [UpdateProbe(schedule=every(10))] + ([AdamProbe(schedule=every(10))] if cfg.optimizer == "adamw" else [])
        if cfg.curvature_every:
            probes.append(CurvatureProbe(lambda m: loss_fn(m(X), Y), schedule=every(cfg.curvature_every), iters=cfg.curvature_iters))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an MLP has no attention or residual blocks to observe
            monitor = Monitor(model, opt, store=cfg.store or None, run_name=cfg.run_name, probes=probes, config=cfg.to_dict(),
                              meta=meta, flush_every=cfg.log_every, diagnose=cfg.diagnose, alerts=False)

    losses = torch.full((cfg.steps,), float("nan"), dtype=torch.float64)
    val_losses: list[tuple[int, float]] = []
    try:
        with sigterm_interrupts():
            status, diverged_at, steps_done = _fullbatch_loop(cfg, model, opt, loss_fn, data, losses, val_losses, monitor)
            train_loss = losses[:steps_done].numpy()
            final_train = final_loss(train_loss)
            final_val = val_losses[-1][1] if status == "completed" and val_losses else math.nan
            history: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            run_id = None
            if monitor is not None:
                monitor.close(status, meta=dict(final_train_loss=final_train, final_val_loss=final_val, steps_done=steps_done))
                history = {k: (np.asarray(s), np.asarray(v)) for k, (s, v) in monitor.history.items()}
                run_id = monitor.run_id
    except BaseException as exc:
        close_after_exception(exc, monitor, run_id=monitor.run_id if monitor is not None else None, t_start=t_start)
        raise
    return RunResult(
        status=status, steps_done=steps_done, train_loss=train_loss, val_loss=val_losses, final_train_loss=final_train,
        final_val_loss=final_val, max_attn_logit=math.nan, history=history, config=cfg.to_dict(), meta=meta,
        wall_time=time.time() - t_start, run_id=run_id, store=cfg.store or None, diverged_at=diverged_at,
        events=list(monitor.events) if monitor is not None else [],
    )


def _fullbatch_loop(cfg, model, opt, loss_fn, data, losses, val_losses, monitor) -> tuple[str, int | None, int]:
    """Full-batch steps; returns ``(status, diverged_at, steps_done)``."""
    X, Y = data["train"]
    status, diverged_at, step = "completed", None, 0
    for step in range(cfg.steps):
        loss = loss_fn(model(X), Y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses[step] = loss.detach().double()
        if monitor is not None:
            monitor.step(loss)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            diverged_at = first_nonfinite_step(losses, max(0, done - cfg.log_every), done)
            if diverged_at is not None:
                status = "diverged"
                break
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
            vals = _evaluate(model, data, loss_fn, cfg.task)
            val_losses.append((done, vals["val/loss"]))
            if monitor is not None:
                monitor.log(vals, step=step)
    return status, diverged_at, step + 1


@torch.no_grad()
def _evaluate(model: nn.Module, data, loss_fn, task: str) -> dict[str, float]:
    out = {}
    for split in ("train", "val"):
        x, y = data[split]
        z = model(x)
        out[f"{split}/loss"] = float(loss_fn(z, y))
        if task == "modular":
            out[f"{split}/acc"] = float((z.argmax(-1) == y).float().mean())
    return out
