"""Spike autopsy: replay the steps before a loss spike several ways and say where it comes from.

From the newest checkpoint at least ``window`` steps before the spike, the window (and ``after``
steps past the spike, to see the recovery) is trained again several ways, each a separate run in
the run store:

* **same data, same seeds**: does it reproduce the recorded losses bitwise? If not, the run is not
  deterministic on this machine or the hardware erred (Megatron-LM's rerun check);
* **other data**: the window's batches replaced by others, and the same batches in reverse order:
  data-caused or state-caused (Chowdhery et al. 2022, PaLM, arXiv 2204.02311, section 5.1);
* **lower LR**: x0.5 and x0.25 from the checkpoint on (Wortsman et al. 2023, arXiv 2309.14322);
* **mitigations switched on at the checkpoint**: z-loss 1e-4 (PaLM), gradient clipping at 1.0,
  a lower Adam beta2 and a larger epsilon (Molybog et al. 2023, arXiv 2304.09871), SPAM-style
  clipping of spiking gradient entries (Huang et al. 2025, arXiv 2501.06842), skipping the spike's
  batches (PaLM).

It returns (and prints, with the CLI, and stores) a table: per replay the peak loss, steps to
recover, final loss, the signals that moved, and a verdict sentence. Replays run in parallel on
the sweep backends (a local process pool, or Ray). See :mod:`seismo.proxy.autopsy_verdict` for
the measures and docs/AUTOPSY.md for the command.

Two entry points: :func:`autopsy` for any training loop (``make_batch(i)``, ``build()``,
``loss_fn``, a checkpoint), :func:`autopsy_run` for a run of the proxy lab (``seismo autopsy``).
"""

from __future__ import annotations

import math
import os
import pickle
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from seismo.errors import ConfigError
from seismo.mitigate.schedules import lr_at as schedule_lr_at
from seismo.mitigate.schedules import seqlen_warmup
from seismo.proxy.autopsy_replay import ReplaySpec, default_spam_threshold, qk_clipper, run_replay
from seismo.proxy.autopsy_verdict import AutopsyVerdict, analyse
from seismo.proxy.data import load_dataset
from seismo.proxy.model import TinyGPT
from seismo.proxy.sweep import exit_with_parent, ray_completed
from seismo.proxy.train import TrainConfig, build_optimizer, checkpoint_history, poison_batch
from seismo.store import RunStore

__all__ = ["AutopsyResult", "FunctionLoop", "ProxyLoop", "autopsy", "autopsy_run", "standard_replays", "run_autopsy",
           "choose_checkpoint", "DEFAULT_WINDOW", "BACKENDS"]

DEFAULT_WINDOW = 20
BACKENDS = ("local", "ray")
OTHER_OFFSET = 1_000_003  # "other data" trains on the batches this many indices further on


@dataclass
class AutopsyResult:
    """What :func:`autopsy` found: the verdict (table rows, cause, sentence) and where it is stored."""

    verdict: AutopsyVerdict
    records: list[dict]
    checkpoint_step: int
    store: str | None = None
    run_ids: dict[str, int] = field(default_factory=dict)
    summary_run_id: int | None = None
    wall_time: float = 0.0

    @property
    def cause(self) -> str:
        return self.verdict.cause

    @property
    def sentence(self) -> str:
        return self.verdict.sentence

    @property
    def rows(self):
        return self.verdict.rows

    def table(self) -> str:
        """The table as plain text (the CLI prints it with rich)."""
        head = f"{'replay':<22} {'peak loss':>10} {'at':>6} {'recover':>8} {'final':>8}  {'effect':<10} signals that moved"
        lines = [head]
        for r in self.rows:
            rec = "-" if r.steps_to_recover is None else str(r.steps_to_recover)
            lines.append(f"{r.name:<22} {r.peak_loss:>10.4g} {r.peak_step if r.peak_step is not None else '-':>6} {rec:>8} "
                         f"{r.final_loss:>8.4g}  {r.effect:<10} {', '.join(r.moved) or '-'}")
        return "\n".join(lines) + f"\n\n{self.sentence}"


# --- loops -------------------------------------------------------------------------------------

@dataclass
class FunctionLoop:
    """A :class:`seismo.proxy.autopsy_replay.Loop` made of plain callables (what :func:`autopsy` takes).
    Replays run in worker processes only when every callable pickles (module-level functions)."""

    make_batch_fn: Callable[[int], Any]
    build_fn: Callable[[], tuple[torch.nn.Module, torch.optim.Optimizer]]
    loss: Callable[[torch.nn.Module, Any, int], Any]
    lr_fn: Callable[[int], float] | None = None
    grad_scale_fn: Callable[[int], float] | None = None
    z_loss: float = 0.0
    grad_clip: float = 0.0
    monitor: str = "default"
    monitor_every: int = 0

    def make_batch(self, i: int) -> Any:
        return self.make_batch_fn(i)

    def build(self):
        return self.build_fn()

    def loss_fn(self, model, batch, step):
        return self.loss(model, batch, step)

    def lr_at(self, step: int) -> float | None:
        return None if self.lr_fn is None else self.lr_fn(step)

    def grad_scale(self, step: int) -> float:
        return 1.0 if self.grad_scale_fn is None else self.grad_scale_fn(step)


class ProxyLoop:
    """The proxy training loop (:func:`seismo.proxy.train.train`) as an autopsy loop, step for step:
    its schedule, sequence-length warm-up, z-loss, clipping and injected spikes. Picklable (the
    dataset is loaded again in each worker)."""

    def __init__(self, config: Mapping[str, Any]):
        self.config = dict(config)
        self._cfg: TrainConfig | None = None
        self._ds = None
        cfg = self.cfg
        self.z_loss, self.grad_clip = cfg.z_loss, cfg.optim.grad_clip
        self.monitor, self.monitor_every = cfg.monitor, cfg.monitor_every
        self.poison, self.burst, self.spikes = set(cfg.spikes.poison_steps), set(cfg.spikes.lr_burst_steps), set(cfg.spikes.steps)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_cfg", "_ds")} | {"_cfg": None, "_ds": None}

    @property
    def cfg(self) -> TrainConfig:
        if self._cfg is None:
            self._cfg = TrainConfig.from_dict(self.config)
        return self._cfg

    @property
    def dataset(self):
        if self._ds is None:
            self._ds = load_dataset(self.cfg.data)
            self.cfg.model.vocab_size = self._ds.vocab_size  # as train() does: the data decides the vocabulary
        return self._ds

    @property
    def seq_len(self) -> int:
        return self.cfg.seq_len or self.cfg.model.block_size

    def make_batch(self, i: int):
        cfg = self.cfg
        x, y = self.dataset.batch("train", cfg.seed, i, cfg.batch_size, self.seq_len, cfg.device)
        if i in self.poison:
            x, y = poison_batch(x, y, cfg.seed, i, cfg.model.vocab_size)
        return x, y

    def build(self):
        cfg = self.cfg
        _ = self.dataset
        torch.manual_seed(cfg.seed)
        model = TinyGPT(cfg.model).to(torch.device(cfg.device))
        return model, build_optimizer(model, cfg.optim)

    def loss_fn(self, model, batch, step: int):
        cfg, slw = self.cfg, self.cfg.seqlen_warmup
        x, y = batch
        if slw.enabled:
            n = seqlen_warmup(step, min(slw.start, self.seq_len), self.seq_len, slw.steps or max(1, cfg.optim.warmup_steps), slw.multiple)
            x, y = x[:, :n], y[:, :n]
        logits, loss = model(x, y)
        return loss, logits, (y == -1)

    def lr_at(self, step: int) -> float:
        o = self.cfg.optim
        lr = schedule_lr_at(step, o.lr, o.warmup_steps, self.cfg.steps, o.decay, o.lr * o.min_lr_ratio)
        return lr * self.cfg.spikes.lr_burst_factor if step in self.burst else lr

    def grad_scale(self, step: int) -> float:
        return self.cfg.spikes.factor if step in self.spikes else 1.0


# --- which replays -----------------------------------------------------------------------------

def _adam_like(optimizer: torch.optim.Optimizer) -> tuple[float, float] | None:
    """``(beta2, eps)`` of the first group if the optimizer keeps Adam's second moment, else None."""
    g = optimizer.param_groups[0]
    if "betas" not in g or "eps" not in g:
        return None
    return float(g["betas"][1]), float(g["eps"])


def qk_clip_applies(model: torch.nn.Module) -> bool:
    """Whether QK-Clip can act on ``model``: attention whose logits scale with W_q, W_k (not qk-norm)."""
    try:
        clip = qk_clipper(model, 100.0)
    except ConfigError:
        return False
    del clip
    return True


def standard_replays(loop, optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None, *,
                     logits: bool = True) -> list[ReplaySpec]:
    """The replays that apply to ``loop``, ``optimizer`` and ``model``: controls, data, lower LR
    and every mitigation that can be switched on mid-run (those already on are left out; QK-Clip
    only where ``model`` has attention it can rescale). qk-layernorm is not among them: it changes
    the architecture, and a checkpoint trained without it does not fit a model with it."""
    specs = [
        ReplaySpec("same data", "control", description="same batches, same seeds"),
        ReplaySpec("other data", "data", data="other", description="the window's batches replaced by others"),
        ReplaySpec("reordered data", "data", data="reorder", description="the window's batches in reverse order"),
        ReplaySpec("lr x0.5", "lr", lr_scale=0.5, description="learning rate halved from the checkpoint on"),
        ReplaySpec("lr x0.25", "lr", lr_scale=0.25, description="learning rate quartered from the checkpoint on"),
    ]
    if logits and loop.z_loss < 1e-4:
        specs.append(ReplaySpec("z-loss 1e-4", "mitigation", z_loss=1e-4, description="z-loss 1e-4 * (log Z)^2 (PaLM)"))
    if not 0 < loop.grad_clip <= 1.0:
        specs.append(ReplaySpec("clip 1.0", "mitigation", grad_clip=1.0, description="global gradient norm clipped at 1.0"))
    adam = _adam_like(optimizer)
    if adam is not None:
        beta2, eps = adam
        lower = 0.95 if beta2 > 0.95 else round(1 - 2 * (1 - beta2), 6)
        if 0.5 <= lower < beta2:
            specs.append(ReplaySpec(f"beta2 {lower:g}", "mitigation", beta2=lower, description=f"Adam beta2 {beta2:g} -> {lower:g}"))
        larger = 1e-6 if eps < 1e-6 else eps * 100
        specs.append(ReplaySpec(f"eps {larger:g}", "mitigation", eps=larger, description=f"Adam eps {eps:g} -> {larger:g}"))
        specs.append(ReplaySpec("SPAM clipping", "mitigation", spam_threshold=default_spam_threshold(beta2),
                                description="gradient entries with g^2 > theta * v clipped (SPAM, theta for this beta2)"))
    if model is not None and qk_clip_applies(model):
        specs.append(ReplaySpec("QK-Clip 100", "mitigation", qk_clip=100.0, description="QK-Clip tau = 100 (Kimi K2)"))
    specs.append(ReplaySpec("skip spike batches", "mitigation", data="skip", description="the spike's batches dropped from the stream"))
    return specs


# --- running -----------------------------------------------------------------------------------

def choose_checkpoint(steps: Sequence[int], spike: int, window: int) -> int:
    """The newest checkpoint step at least ``window`` steps before ``spike``."""
    ok = [s for s in steps if s <= spike - window]
    if not ok:
        have = ", ".join(map(str, sorted(steps))) or "none"
        raise ConfigError(f"step: no checkpoint at least {window} steps before step {spike} (checkpoints at steps: {have}); "
                          "use a smaller --window, or train with checkpoint_every (and checkpoint_keep=0 to keep them all)")
    return max(ok)


def _picklable(obj: Any) -> bool:
    try:
        pickle.dumps(obj)
    except (pickle.PicklingError, AttributeError, TypeError):
        return False
    return True


def _execute(jobs: list[dict], workers: int, backend: str, ray_address: str | None) -> Iterator[dict]:
    if backend == "ray":
        yield from (result for _, result in ray_completed(run_replay, list(enumerate(jobs)), workers, ray_address))
        return
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield run_replay(**job)
        return
    import concurrent.futures as cf
    import multiprocessing as mp

    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
        futures = [pool.submit(run_replay, **job) for job in jobs]
        try:
            for fut in cf.as_completed(futures):
                yield fut.result()
        finally:
            for fut in futures:
                fut.cancel()


def run_autopsy(loop, checkpoints: Mapping[int, Any], spike: int, *, window: int = DEFAULT_WINDOW, after: int | None = None,
                max_step: int | None = None, recorded: Mapping[int, float] | None = None, replays: Sequence[ReplaySpec] | None = None,
                skip: int = 3, other_offset: int = OTHER_OFFSET, store: str | os.PathLike | None = None, run_name: str = "run",
                run_config: Mapping[str, Any] | None = None, workers: int = 1, backend: str = "local", ray_address: str | None = None,
                threads: int = 0) -> AutopsyResult:
    """The autopsy of the spike at step ``spike``. ``checkpoints`` maps a step to a checkpoint (a
    dict with ``model``, ``optim`` and optionally ``rng``, or a path to one saved by ``torch.save``)
    taken after that many steps; ``recorded`` the run's loss per step (for the bitwise check)."""
    t0 = time.time()
    _check_ints(spike=spike, window=window, skip=skip, workers=workers)
    if backend not in BACKENDS:
        raise ConfigError(f"backend: must be one of {BACKENDS}, got {backend!r}")
    if window < 1:
        raise ConfigError(f"window: must be >= 1, got {window}")
    after = window if after is None else after
    _check_ints(after=after)
    start = choose_checkpoint(list(checkpoints), spike, window)
    stop = spike + after + 1 if max_step is None else min(max_step, spike + after + 1)
    if stop <= spike:
        raise ConfigError(f"step: {spike} is beyond the run's last step {max_step - 1}")
    ck = checkpoints[start]
    ck_data = torch.load(ck, map_location="cpu", weights_only=True) if isinstance(ck, (str, os.PathLike)) else ck
    if isinstance(ck_data.get("step"), int) and ck_data["step"] != start:
        raise ConfigError(f"checkpoint: the checkpoint given for step {start} was taken at step {ck_data['step']}")
    if replays is None:
        model, optimizer = loop.build()
        with torch.no_grad():  # does loss_fn hand out logits (for z-loss)?
            out = loop.loss_fn(model, loop.make_batch(start), start)
        replays = standard_replays(loop, optimizer, model, logits=isinstance(out, (tuple, list)) and len(out) > 1)
        del model, optimizer, out
    names = [s.name for s in replays]
    if "same data" not in names or len(set(names)) != len(names):
        raise ConfigError(f"replays: need one 'same data' replay and distinct names, got {names}")
    skip_from = max(start, spike - skip + 1)
    if workers > 1 and backend == "local" and not _picklable(loop):
        warnings.warn("seismo autopsy: the loop's callables do not pickle (closures or lambdas?): replays run one after "
                      "another in this process", RuntimeWarning, stacklevel=2)
        workers = 1
    ck_arg = str(ck) if isinstance(ck, (str, os.PathLike)) and workers > 1 else ck_data
    jobs = [dict(loop=loop, checkpoint=ck_arg, spec=s, start=start, stop=stop, spike=spike, skip_from=skip_from,
                 other_offset=other_offset, threads=threads, run_name=f"{run_name}/autopsy@{spike}/{s.name}") for s in replays]
    records = {r["name"]: r for r in _execute(jobs, workers, backend, ray_address)}
    ordered = [records[n] for n in names]
    kinds = {s.name: s.kind for s in replays}
    result = AutopsyResult(verdict=analyse(ordered, kinds, start=start, spike=spike, stop=stop, recorded=dict(recorded or {}),
                                           skip_from=skip_from), records=ordered, checkpoint_step=start)
    if store:
        _store(result, store, run_name, run_config or {}, dict(window=window, after=after, skip=skip, other_offset=other_offset))
    result.wall_time = time.time() - t0
    return result


def _check_ints(**values: Any) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"{name}: must be an integer >= 0, got {v!r}")


def _store(result: AutopsyResult, store_path, run_name: str, run_config: Mapping[str, Any], settings: dict) -> None:
    v = result.verdict
    base = f"{run_name}/autopsy@{v.spike}"
    common = dict(autopsy_of=run_name, spike_step=v.spike, checkpoint_step=v.start, stop_step=v.stop, **settings)
    with RunStore(store_path) as st:
        for rec, row in zip(result.records, v.rows):
            rows = [(int(s), name, float(x)) for name, (steps, vals) in rec["history"].items() for s, x in zip(steps, vals)]
            if "loss" not in rec["history"]:
                rows += [(int(s), "loss", float(x)) for s, x in zip(rec["steps"], rec["losses"])]
            events = [{k: e.get(k) for k in ("step", "kind", "severity", "module", "message", "evidence", "advice")} for e in rec["events"]]
            meta = dict(common, replay=rec["spec"], row=row.to_dict(), error=rec["error"], wall_time=rec["wall_time"])
            rid = st.record_run(f"{base}/{rec['name']}", config=dict(run_config), meta=_finite(meta), status=_status(rec["status"]),
                                metrics=rows, events=events)
            row.run_id = rid
            result.run_ids[rec["name"]] = rid
        result.summary_run_id = st.record_run(base, config=dict(run_config), meta=_finite(dict(common, autopsy=v.to_dict())),
                                              status="completed", metrics=[], events=[])
    result.store = str(store_path)


def _status(status: str) -> str:
    return status if status in ("completed", "diverged", "failed") else "completed"


def _finite(obj: Any) -> Any:
    """JSON-safe: inf and nan become strings (the store's meta is JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(x) for k, x in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(x) for x in obj]
    return obj


# --- entry points ------------------------------------------------------------------------------

def autopsy(*, make_batch: Callable[[int], Any], build: Callable[[], tuple[torch.nn.Module, torch.optim.Optimizer]],
            loss_fn: Callable[[torch.nn.Module, Any, int], Any], checkpoint: Any, step: int, window: int = DEFAULT_WINDOW,
            after: int | None = None, lr_at: Callable[[int], float] | None = None, grad_scale: Callable[[int], float] | None = None,
            z_loss: float = 0.0, grad_clip: float = 0.0, losses: Mapping[int, float] | Sequence[float] | None = None,
            monitor: str = "default", **options: Any) -> AutopsyResult:
    """Autopsy of the spike at ``step`` of any training loop.

    ``make_batch(i)`` gives the batch a step ``i`` trains on; ``build()`` a fresh model and optimizer;
    ``loss_fn(model, batch, step)`` the loss (or ``(loss, logits)`` to allow z-loss); ``checkpoint``
    a dict with ``model``, ``optim``, ``step`` (and ``rng``), a path to one, or a list of them (the
    newest at least ``window`` steps before ``step`` is used); ``lr_at(step)`` the schedule (else the
    checkpoint's learning rates stay); ``losses`` the recorded loss per step (a mapping, or a
    sequence indexed by step) for the bitwise check. ``options`` go to :func:`run_autopsy`
    (``store``, ``run_name``, ``workers``, ``backend``, ``replays``, ``skip``, ``other_offset``, ...)."""
    loop = FunctionLoop(make_batch, build, loss_fn, lr_at, grad_scale, z_loss, grad_clip, monitor)
    cks = checkpoint if isinstance(checkpoint, (list, tuple)) else [checkpoint]
    by_step: dict[int, Any] = {}
    for ck in cks:
        data = torch.load(ck, map_location="cpu", weights_only=True) if isinstance(ck, (str, os.PathLike)) else ck
        if not isinstance(data, Mapping) or not {"model", "optim", "step"} <= set(data):
            raise ConfigError("checkpoint: must be a dict with 'model', 'optim' and 'step' (and optionally 'rng'), or a path to one")
        by_step[int(data["step"])] = ck if isinstance(ck, (str, os.PathLike)) else data
    if losses is None or isinstance(losses, Mapping):
        recorded = dict(losses) if losses is not None else None
    else:
        recorded = {i: float(x) for i, x in enumerate(losses)}
    return run_autopsy(loop, by_step, step, window=window, after=after, recorded=recorded, **options)


def _run_dir(config: Mapping[str, Any], store_path: Path, run_dir: str | os.PathLike | None) -> Path:
    if run_dir is not None:
        return Path(run_dir)
    out = str(config.get("out_dir") or "")
    if not out:
        raise ConfigError("run: it was trained without a run directory (out_dir), so it has no checkpoints; give --run-dir")
    p = Path(out)
    if p.is_absolute() or p.exists():
        return p
    beside = store_path.parent / p.name  # `seismo train --out runs` writes runs/<name> next to runs/seismo.sqlite
    return beside if beside.exists() else p


def proxy_checkpoints(run_dir: Path, run_uid: str | None = None) -> dict[int, Path]:
    """``{step: path}`` of the run's checkpoints: the kept periodic ones and ``checkpoint.pt``."""
    found = dict(checkpoint_history(run_dir))
    last = run_dir / "checkpoint.pt"
    if last.exists():
        ck = torch.load(last, map_location="cpu", weights_only=True)
        if run_uid and ck.get("run_uid") and ck["run_uid"] != run_uid:
            raise ConfigError(f"run: the checkpoints in {run_dir} belong to another run")
        found.setdefault(int(ck["step"]), last)
    return found


def autopsy_run(store: str | os.PathLike, run: str | int, step: int, *, window: int = DEFAULT_WINDOW,
                run_dir: str | os.PathLike | None = None, **options: Any) -> AutopsyResult:
    """Autopsy of the spike at ``step`` of a proxy-lab run stored in ``store`` (``seismo autopsy``).

    Its checkpoints come from its run directory (``checkpoint_every``; ``checkpoint_keep`` of them
    are kept in ``<run dir>/checkpoints/``); its recorded losses from the store."""
    store_path = Path(store)
    with RunStore(store_path) as st:
        info = st.find_run(run)
        steps, values = st.series(info.run_id, "loss") if "loss" in st.metric_names(info.run_id) else ([], [])
    config = info.config
    if not config or "optim" not in config or config.get("kind") == "fullbatch":
        raise ConfigError(f"run: {info.name!r} is not a TinyGPT run of the proxy lab; use seismo.proxy.autopsy.autopsy() for other loops")
    rdir = _run_dir(config, store_path, run_dir)
    cks = proxy_checkpoints(rdir, info.meta.get("run_uid"))
    if not cks:
        raise ConfigError(f"run: no checkpoints in {rdir}; train with --set checkpoint_every=K to make a run autopsiable")
    loop = ProxyLoop(config)
    if loop.cfg.guard != "none":
        warnings.warn("seismo autopsy: the run used the Guard; the replays run without it", RuntimeWarning, stacklevel=2)
    options.setdefault("threads", int(info.meta.get("torch_threads") or 0))
    return run_autopsy(loop, cks, step, window=window, max_step=loop.cfg.steps,
                       recorded={int(s): float(v) for s, v in zip(steps, values)}, store=store_path, run_name=info.name,
                       run_config=config, **options)
