"""Sweeps: learning rate x model size x intervention x seed over :func:`seismo.proxy.train`.

Every trial is monitored (the ``default`` probes) and recorded in the run store with its config,
in ONE transaction written by the driver (workers never touch the SQLite file), so a sweep killed
at any moment and re-run skips the finished trials and re-runs the rest: each trial ends up
stored exactly once. Trials are deterministic (one torch thread per worker, seeded data), so the
results do not depend on the number of workers or the backend.

Backends: ``local`` (a process pool) and ``ray`` (Ray tasks; ``pip install 'seismo[ray]'``).

A trial that raises is stored as ``failed`` with the exception's one-line summary (the sweep goes
on); a re-run retries it and the new result replaces the failed one. Pool workers watch their
parent and exit when it dies, so ``kill -9`` of the driver leaves no worker training on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from seismo.errors import ConfigError
from seismo.proxy.config import apply_overrides
from seismo.proxy.fullbatch import FullBatchConfig, train_fullbatch
from seismo.proxy.measures import divergence_rate, lr_sensitivity, optimal_lr, trial_measures
from seismo.proxy.presets import get_preset
from seismo.proxy.train import TrainConfig, error_summary, train
from seismo.store import RunStore

__all__ = ["SweepConfig", "Trial", "expand", "run_sweep", "load_sweep_results", "load_sweep_file", "SweepSummary", "summarize_sweep"]

BACKENDS = ("local", "ray")


@dataclass
class SweepConfig:
    """A grid: every (intervention, size, lr, seed) combination is one trial.

    ``base`` is a training preset name; ``overrides`` (``key=value`` strings, as ``--set``) apply
    to every trial; ``sizes`` maps a size name to model overrides; ``interventions`` maps a name to
    overrides (``[]`` is the baseline).
    """

    name: str
    base: str = "baseline"
    lrs: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1])
    sizes: dict[str, list[str]] = field(default_factory=lambda: {"base": []})
    interventions: dict[str, list[str]] = field(default_factory=lambda: {"baseline": []})
    seeds: list[int] = field(default_factory=lambda: [0])
    overrides: list[str] = field(default_factory=list)
    description: str = ""

    def validate(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"sweep.name: must be a non-empty name without '/', got {self.name!r}")
        if not self.lrs or any(not (isinstance(lr, (int, float)) and lr > 0) for lr in self.lrs):
            raise ConfigError(f"sweep.lrs: need positive learning rates, got {self.lrs!r}")
        if not self.sizes or not self.interventions or not self.seeds:
            raise ConfigError("sweep: sizes, interventions and seeds must each have at least one entry")
        bad = [s for s in self.seeds if not isinstance(s, int) or isinstance(s, bool) or s < 0]
        if bad:  # int(1.5) would silently run seed 1
            raise ConfigError(f"sweep.seeds: must be integers >= 0, got {bad[0]!r}")


@dataclass(frozen=True)
class Trial:
    sweep: str
    intervention: str
    size: str
    lr: float
    seed: int
    config: dict  # TrainConfig.to_dict()
    key: str  # content hash of the config: the trial's identity in the store

    @property
    def run_name(self) -> str:
        return f"{self.sweep}/{self.intervention}/{self.size}/lr={self.lr:g}/seed={self.seed}"


def _key(cfg: dict) -> str:
    ident = {k: v for k, v in cfg.items() if k not in ("out_dir", "store", "run_name")}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def expand(sweep: SweepConfig) -> list[Trial]:
    """All trials of a sweep, in a fixed order; bad overrides fail here, before anything runs."""
    sweep.validate()
    trials = []
    for iname, iov in sweep.interventions.items():
        for sname, sov in sweep.sizes.items():
            for lr in sweep.lrs:
                for seed in sweep.seeds:
                    cfg = get_preset(sweep.base)
                    apply_overrides(cfg, list(sweep.overrides) + list(sov) + list(iov))
                    if hasattr(cfg, "optim"):
                        cfg.optim.lr = float(lr)
                    else:  # a full-batch MLP config (seismo.proxy.fullbatch)
                        cfg.lr = float(lr)
                    cfg.seed = int(seed)
                    cfg.out_dir, cfg.store = "", ""
                    cfg.run_name = f"{sweep.name}/{iname}/{sname}/lr={lr:g}/seed={seed}"
                    cfg.validate()
                    d = cfg.to_dict()
                    trials.append(Trial(sweep.name, iname, sname, float(lr), int(seed), d, _key(d)))
    seen: dict[str, Trial] = {}
    for t in trials:  # equal configs share a key: a resumed sweep would store one and silently drop the other
        if t.key in seen:
            raise ConfigError(f"sweep: trials {seen[t.key].run_name} and {t.run_name} have identical configs; remove one")
        seen[t.key] = t
    return trials


def run_trial(config: dict) -> dict:
    """Run one trial in the current process (one torch thread) and return a picklable record.

    ``config`` is a ``TrainConfig`` dict (TinyGPT) or, with ``kind == "fullbatch"``, a
    :class:`seismo.proxy.fullbatch.FullBatchConfig` dict (full-batch MLP). An exception in
    training gives a ``failed`` record carrying its one-line summary in ``error``."""
    t0 = time.time()
    try:
        return _train_trial(config, t0)
    except Exception as exc:  # noqa: BLE001 - one failing trial is recorded as failed; the sweep goes on
        return dict(status="failed", error=error_summary(exc), steps_done=0, final_train_loss=math.nan,
                    final_val_loss=math.nan, max_attn_logit=math.nan, wall_time=time.time() - t0, history={}, events=[])


def _train_trial(config: dict, t0: float) -> dict:
    torch.set_num_threads(1)
    if config.get("kind") == "fullbatch":
        r = train_fullbatch(FullBatchConfig.from_dict(config))
        fallback_init = math.nan
    else:
        cfg = TrainConfig.from_dict(config)
        r = train(cfg)
        fallback_init = math.log(cfg.model.vocab_size)
    hist = {k: (np.asarray(s).tolist(), np.asarray(v).tolist()) for k, (s, v) in r.history.items()}
    logz = r.history.get("logits/logz_mean")
    init_loss = float(r.train_loss[0]) if len(r.train_loss) and np.isfinite(r.train_loss[0]) else fallback_init
    return dict(
        status=r.status, steps_done=r.steps_done, final_train_loss=r.final_train_loss, final_val_loss=r.final_val_loss,
        max_attn_logit=r.max_attn_logit, final_logz=float(logz[1][-1]) if logz is not None and len(logz[1]) else math.nan,
        init_loss=init_loss, n_params=r.meta.get("n_params"), diverged_at=r.diverged_at,
        wall_time=time.time() - t0, history=hist, events=[e.to_dict() for e in r.events],
        **trial_measures(r.history),
    )


def exit_with_parent(parent_pid: int, poll_s: float = 0.2) -> None:
    """Pool-worker initializer: exit this process as soon as ``parent_pid`` is no longer its parent.

    A ``kill -9`` of the sweep driver cannot tell its workers anything; without this they would
    finish their trials (and start queued ones) for nobody. A daemon thread polls ``os.getppid()``
    (re-parenting is the only sign of the death that works on every POSIX system)."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)  # no cleanup: the parent is gone and nothing this worker holds is worth saving

    threading.Thread(target=watch, name="seismo-exit-with-parent", daemon=True).start()


def _store_trial(store, trial: Trial, rec: dict, replaces: int | None = None) -> int:
    meta = {k: v for k, v in rec.items() if k not in ("history", "events")}
    meta.update(sweep=trial.sweep, trial_key=trial.key, intervention=trial.intervention, size=trial.size, lr=trial.lr, seed=trial.seed)
    rows = [(int(s), name, float(v)) for name, (steps, vals) in rec["history"].items() for s, v in zip(steps, vals)]
    events = [{k: e[k] for k in ("step", "kind", "severity", "module", "message", "evidence", "advice")} for e in rec["events"]]
    return store.record_run(trial.run_name, config=trial.config, meta=meta, status=rec["status"], metrics=rows, events=events,
                            replaces=replaces)


def finished_keys(store, sweep_name: str) -> set[str]:
    return {r.meta.get("trial_key") for r in store.runs() if r.meta.get("sweep") == sweep_name and r.status in ("completed", "diverged")}


def failed_runs(store, sweep_name: str) -> dict[str, int]:
    """``{trial key: run id}`` of the sweep's failed trials: a re-run retries them in their place."""
    return {r.meta.get("trial_key"): r.run_id for r in store.runs() if r.meta.get("sweep") == sweep_name and r.status == "failed"}


def _local_results(todo: list[Trial], workers: int) -> Iterator[tuple[Trial, dict]]:
    if workers <= 1:
        for t in todo:
            yield t, run_trial(t.config)
        return
    import concurrent.futures as cf
    import multiprocessing as mp

    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(run_trial, t.config): t for t in todo}
        try:
            for fut in cf.as_completed(futures):
                yield futures[fut], fut.result()
        finally:  # Ctrl-C or an error: drop the queued trials, or leaving the pool would run them all first
            for fut in futures:
                fut.cancel()


def ray_completed(fn: Callable[..., Any], calls: list[tuple[Any, dict]], workers: int,
                  address: str | None) -> Iterator[tuple[Any, Any]]:
    """``fn(**kwargs)`` for each ``(key, kwargs)`` of ``calls`` as Ray tasks of one CPU each; yields
    ``(key, result)`` as they finish. Starts a local Ray with ``workers`` CPUs (or joins ``address``)
    unless one is running, and shuts down only what it started."""
    try:
        import ray
    except ImportError:
        raise ConfigError("backend: the ray backend needs Ray: pip install 'seismo[ray]'") from None
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        if address:
            kwargs["address"] = address
        else:  # "local": without it ray.init joins a cluster from RAY_ADDRESS / `ray start` and rejects num_cpus
            kwargs.update(address="local", num_cpus=workers)
        ray.init(**kwargs)
        started = True
    try:
        remote = ray.remote(num_cpus=1)(fn)
        pending = {remote.remote(**kw): key for key, kw in calls}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                yield pending.pop(ref), ray.get(ref)
    finally:
        if started:
            ray.shutdown()


def run_sweep(
    sweep: SweepConfig,
    store_path: str | os.PathLike,
    *,
    workers: int | None = None,
    backend: str = "local",
    ray_address: str | None = None,
    on_progress: Callable[[int, int, int, Trial | None], None] | None = None,
) -> list[int]:
    """Run every unfinished trial; return the run ids of the trials finished now.

    ``on_progress(done, total, running, trial)`` is called as trials finish.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend: must be one of {BACKENDS}, got {backend!r}")
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise ConfigError(f"workers: must be >= 1, got {workers}")
    trials = expand(sweep)
    store = RunStore(store_path)
    try:
        done_keys = finished_keys(store, sweep.name)
        failed = failed_runs(store, sweep.name)
        todo = [t for t in trials if t.key not in done_keys]
        total, done = len(trials), len(trials) - len(todo)
        if on_progress:
            on_progress(done, total, min(workers, len(todo)), None)
        results = (ray_completed(run_trial, [(t, dict(config=t.config)) for t in todo], workers, ray_address) if backend == "ray"
                   else _local_results(todo, workers))
        new_ids = []
        for trial, rec in results:
            new_ids.append(_store_trial(store, trial, rec, replaces=failed.pop(trial.key, None)))
            done += 1
            if on_progress:
                on_progress(done, total, min(workers, total - done), trial)
        return new_ids
    finally:
        store.close()


# --- reading results back ---------------------------------------------------------------

@dataclass
class SweepSummary:
    name: str
    rows: list[dict]  # one per trial: intervention, size, lr, seed, status, final_val_loss, ...
    sensitivity: dict[tuple[str, str], float]  # (intervention, size) -> LR sensitivity
    best_lr: dict[tuple[str, str], float]
    divergence: dict[tuple[str, str], float]
    n_params: dict[str, float]


def load_sweep_results(store_path: str | os.PathLike, sweep_name: str, keys: set[str] | None = None) -> list[dict]:
    """The finished trials stored under ``sweep_name``, one dict each (the run's meta + run_id, status).

    ``keys`` (trial keys, e.g. ``{t.key for t in expand(sweep)}``) keeps only the trials of that
    exact grid: a sweep re-run under the same name with other settings (``--set steps=...``, a
    newer seismo whose configs carry another field) stores new trials next to the old ones."""
    with RunStore(store_path) as store:
        return [dict(r.meta, run_id=r.run_id, status=r.status) for r in store.runs()
                if r.meta.get("sweep") == sweep_name and r.status in ("completed", "diverged")
                and (keys is None or r.meta.get("trial_key") in keys)]


def summarize_sweep(rows: list[dict], name: str = "") -> SweepSummary:
    """LR sensitivity (final validation loss, seeds averaged), best LR and divergence rate per
    (intervention, size)."""
    groups: dict[tuple[str, str], dict[float, list[dict]]] = {}
    n_params: dict[str, float] = {}
    for r in rows:
        groups.setdefault((r["intervention"], r["size"]), {}).setdefault(float(r["lr"]), []).append(r)
        if r.get("n_params"):
            n_params[r["size"]] = float(r["n_params"])
    sens, best, div = {}, {}, {}
    for key, by_lr in groups.items():
        lrs = sorted(by_lr)
        losses = [float(np.mean([x["final_val_loss"] if x["status"] == "completed" else math.nan for x in by_lr[lr]])) for lr in lrs]
        l0 = float(np.nanmedian([x["init_loss"] for lr in lrs for x in by_lr[lr]]))
        sens[key] = lr_sensitivity(losses, l0)
        best[key] = optimal_lr(lrs, losses, l0)
        div[key] = divergence_rate([x["status"] for lr in lrs for x in by_lr[lr]])
    return SweepSummary(name, rows, sens, best, div, n_params)


def load_sweep_file(path: str | os.PathLike) -> SweepConfig:
    """Read a sweep from a TOML file (keys as :class:`SweepConfig` fields)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError("reading TOML sweeps on Python 3.10 needs tomli: pip install tomli") from None
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"sweep file {p}: {exc}") from None
    names = {f.name for f in dataclasses.fields(SweepConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"sweep file {p}: unknown key(s) {unknown}; known: {sorted(names)}")
    data.setdefault("name", p.stem)
    cfg = SweepConfig(**data)
    cfg.validate()
    return cfg
