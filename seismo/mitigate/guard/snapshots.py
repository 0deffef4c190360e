"""The Guard's checkpoints: in-memory copies, on-disk snapshots written by a background thread,
and the JSON tracker that lets a restarted job repeat what the failed one did.

Every file is written atomically (``seismo._io``: temporary file, fsync, ``os.replace``, directory
fsync), so a ``kill -9`` during a write leaves the previous file loadable. Snapshots load with
``weights_only=True``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import queue
import re
import shutil
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
from torch import Tensor

from seismo._io import atomic_torch_save, atomic_write_json, atomic_write_text
from seismo.errors import ConfigError
from seismo.mitigate.guard.errors import GuardResumeError
from seismo.mitigate.guard.window import SpikeWindow

__all__ = ["TRACKER_NAME", "CKPT_FORMAT", "TRACKER_FORMAT", "SnapshotWriter", "capture", "restore", "list_snapshots",
           "snapshot_path", "prepare_dir", "load_error_text", "read_tracker", "write_tracker", "remove_temporary_files", "load_snapshot",
           "set_aside"]

logger = logging.getLogger("seismo.guard")

TRACKER_NAME = "guard_tracker.json"
TRACKER_FORMAT = "seismo.guard.tracker/1"
CKPT_FORMAT = "seismo.guard.checkpoint/1"
UNREADABLE_SUFFIX = ".unreadable"
_SNAPSHOT_RE = re.compile(r"^guard-step(\d+)-e(\d+)\.(?:pt|dcp)$")  # .dcp: a sharded model's DCP directory


# --- in-memory copies ------------------------------------------------------------------------------
def to_cpu(obj: Any) -> Any:
    """A deep copy with every tensor copied to the CPU (containers rebuilt, scalars shared)."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_cpu(v) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return copy.deepcopy(obj)


def clone_tree(obj: Any) -> Any:
    """A deep copy (devices kept) handed to ``load_state_dict``, which may keep references to
    the tensors it gets: a ring checkpoint must never become live optimizer state."""
    if isinstance(obj, Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clone_tree(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(clone_tree(v) for v in obj)
    return obj


def capture(step: int, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer, stateful: Mapping[str, Any],
            window: SpikeWindow) -> dict:
    """A CPU copy of everything a rollback restores: model, optimizer, ``stateful`` objects, the
    spike window and the RNG state."""
    rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "format": CKPT_FORMAT,
        "step": step,
        "epoch": epoch,
        "model": to_cpu(model.state_dict()),
        "optimizer": to_cpu(optimizer.state_dict()),
        "stateful": {k: to_cpu(o.state_dict()) for k, o in stateful.items()},
        "window": window.state_dict(),
        "rng": rng,
    }


def restore(ck: Mapping, model: nn.Module, optimizer: torch.optim.Optimizer, stateful: Mapping[str, Any],
            window: SpikeWindow, *, restore_rng: bool, warn: Callable[[str, str], None]) -> int:
    """Load a :func:`capture` into the live objects; returns its step. ``warn(key, message)``
    reports a ``stateful`` object the checkpoint has no state for."""
    if ck.get("format") != CKPT_FORMAT:
        raise ValueError(f"not a seismo Guard checkpoint (format {ck.get('format')!r})")
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(clone_tree(ck["optimizer"]))
    return restore_loop_state(ck, stateful, window, restore_rng=restore_rng, warn=warn, copy_state=clone_tree)


def restore_loop_state(ck: Mapping, stateful: Mapping[str, Any], window: SpikeWindow, *, restore_rng: bool,
                       warn: Callable[[str, str], None], copy_state: Callable[[Any], Any]) -> int:
    """What a checkpoint holds besides model and optimizer: the ``stateful`` objects (through
    ``copy_state``, so the checkpoint stays intact), the spike window and the RNG; returns its step."""
    for k, o in stateful.items():
        if k in ck["stateful"]:
            o.load_state_dict(copy_state(ck["stateful"][k]))
        else:
            warn(f"stateful:{k}", f"seismo Guard: the checkpoint has no state for stateful[{k!r}]")
    window.load_state_dict(ck["window"])
    if restore_rng:
        torch.set_rng_state(ck["rng"]["cpu"])
        if "cuda" in ck["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
    return int(ck["step"])


# --- files ------------------------------------------------------------------------------------------
def prepare_dir(directory: Path) -> None:
    """Create ``directory`` and prove it takes a file (write, rename, delete a probe); a one-line
    ConfigError naming it otherwise. Permission bits alone prove nothing (root ignores them)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = atomic_write_text(directory / f".guard-probe-{os.getpid()}", "seismo Guard write test\n")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"ckpt_dir: cannot write snapshots to {directory} ({exc.strerror or exc}); "
                          "pass a writable directory, or ckpt_dir=None for in-memory checkpoints only") from None


def snapshot_path(directory: Path, step: int, epoch: int, *, sharded: bool = False) -> Path:
    """A snapshot's path: a ``.pt`` file, or a ``.dcp`` directory for a sharded model."""
    return directory / f"guard-step{step:09d}-e{epoch}.{'dcp' if sharded else 'pt'}"


def list_snapshots(directory: Path) -> list[tuple[int, int, Path]]:
    """``(step, epoch, path)`` of every snapshot file in ``directory`` (tmp files are ignored)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []  # no directory (yet): no snapshots
    out = []
    for name in names:
        m = _SNAPSHOT_RE.match(name)
        if m:
            out.append((int(m.group(1)), int(m.group(2)), directory / name))
    return out


def load_snapshot(path: Path) -> dict:
    """A snapshot loaded on the CPU with ``weights_only=True``; any failure raises (the caller decides)."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
        raise ValueError(f"not a seismo Guard snapshot (format {ck.get('format') if isinstance(ck, dict) else None!r})")
    return ck


def load_error_text(exc: BaseException) -> str:
    """One line for a failed load: torch's unpickling errors run over many lines of advice
    (including "retry with weights_only=False", which must not be followed for a damaged file)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first.split('. ')[0][:200]}"


def set_aside(path: Path) -> Path:
    """Rename an unreadable file to ``<name>.unreadable`` (kept for inspection, never overwritten)."""
    target = path.with_name(path.name + UNREADABLE_SUFFIX)
    os.replace(path, target)
    return target


def remove_temporary_files(directory: Path) -> None:
    """Delete the temporary files (and DCP directories) of a writer that was killed mid-write."""
    for name in os.listdir(directory):
        if name.startswith(".guard") and name.endswith(".tmp"):
            path = directory / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                continue
            try:
                path.unlink()
            except FileNotFoundError:
                pass  # another rank removed it first


def read_tracker(directory: Path) -> dict | None:
    """The tracker in ``directory`` (None if there is none); GuardResumeError if unreadable."""
    path = directory / TRACKER_NAME
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise GuardResumeError(f"cannot read the Guard tracker {path} ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != TRACKER_FORMAT:
        raise GuardResumeError(f"{path}: not a seismo Guard tracker (format "
                               f"{data.get('format') if isinstance(data, dict) else None!r})")
    return data


def write_tracker(directory: Path, data: dict) -> None:
    """Write the tracker atomically (raises OSError: the caller falls back to memory)."""
    atomic_write_json(directory / TRACKER_NAME, data)


class SnapshotWriter:
    """One daemon thread that writes snapshots in order and prunes old ones.

    The queue holds at most two pending snapshots (each is a ring entry already in memory); a
    third submission waits, so a slow disk slows training instead of growing memory. The first
    failed write is kept in :attr:`error` (the Guard then stops using the disk); later submissions
    are dropped.
    """

    def __init__(self, directory: Path, keep: int):
        self.dir = directory
        self.keep = keep
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.thread: threading.Thread | None = None
        self.error: tuple[Path, BaseException] | None = None
        self.written = 0

    def submit(self, path: Path, payload: dict) -> None:
        if self.error is not None:
            return
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="seismo-guard-writer", daemon=True)
            self.thread.start()
        self.q.put((path, payload))

    def drain(self) -> None:
        if self.thread is not None:
            self.q.join()

    def close(self) -> None:
        if self.thread is not None:
            self.q.put(None)
            self.thread.join()
            self.thread = None

    def _run(self) -> None:
        while True:
            item = self.q.get()
            try:
                if item is None:
                    return
                path, payload = item
                if self.error is not None:
                    continue
                try:
                    atomic_torch_save(payload, path)
                    self.written += 1
                    self._prune()
                except Exception as exc:  # noqa: BLE001 - a full disk must not kill training; the Guard reports it
                    self.error = (path, exc)
            finally:
                self.q.task_done()

    def _prune(self) -> None:
        files = sorted(list_snapshots(self.dir))
        for _, _, p in files[: max(0, len(files) - self.keep)]:
            try:
                p.unlink()
            except OSError as exc:
                logger.debug("seismo Guard: could not prune %s (%r)", p, exc)
