"""Data that is on every machine: no downloads, ever.

Three sources, all deterministic:

* ``stdlib`` — a byte-level corpus built from the Python standard library's own ``.py`` files
  (sorted by relative path, test suites and site-packages excluded, capped at ``max_bytes``).
  Its SHA-256 goes into the run metadata, so two runs can tell whether they saw the same text.
* ``text`` — any user file or directory of text files, read as bytes (vocabulary 256).
* ``modular`` — modular arithmetic ``(a op b) mod p`` with p = 113 as in Prieto et al. 2025
  (arXiv 2501.04697) and Power et al. 2022 (grokking): sequences ``[a, b, =]`` whose last
  position predicts the answer; a seeded random train/val split of all p^2 pairs.

Batches are a pure function of ``(seed, step)``, which makes checkpoint resume exact and lets
a rollback skip a window of data by step number.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from seismo.errors import ConfigError

__all__ = ["DataConfig", "Dataset", "TokenDataset", "ModularDataset", "load_dataset", "stdlib_corpus"]

SOURCES = ("stdlib", "text", "modular")
MODULAR_OPS = ("add", "sub", "mul")
_SKIP_DIRS = {"test", "tests", "site-packages", "dist-packages", "idlelib", "__pycache__", "lib2to3", "turtledemo"}


@dataclass
class DataConfig:
    """Where the tokens come from. ``path`` is used by ``text``; ``p``/``op``/``train_frac`` by ``modular``."""

    source: str = "stdlib"
    path: str = ""
    max_bytes: int = 4_000_000
    val_frac: float = 0.05
    p: int = 113
    op: str = "add"
    train_frac: float = 0.4
    split_seed: int = 0

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"data.source: must be one of {SOURCES}, got {self.source!r}")
        if self.source == "text" and not self.path:
            raise ConfigError("data.path: the 'text' source needs a file or directory path")
        if not (isinstance(self.max_bytes, int) and self.max_bytes > 1024):
            raise ConfigError(f"data.max_bytes: must be an integer > 1024, got {self.max_bytes!r}")
        if not (0.0 < self.val_frac < 0.5):
            raise ConfigError(f"data.val_frac: must be in (0, 0.5), got {self.val_frac}")
        if not (isinstance(self.p, int) and self.p >= 2):
            raise ConfigError(f"data.p: must be an integer >= 2, got {self.p!r}")
        if self.op not in MODULAR_OPS:
            raise ConfigError(f"data.op: must be one of {MODULAR_OPS}, got {self.op!r}")
        if not (0.0 < self.train_frac < 1.0):
            raise ConfigError(f"data.train_frac: must be in (0, 1), got {self.train_frac}")


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for f in sorted(filenames):
            if f.endswith(".py"):
                files.append(Path(dirpath) / f)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read_files(files: list[Path], max_bytes: int) -> bytes:
    chunks, total = [], 0
    for f in files:
        try:
            b = f.read_bytes()
        except OSError:
            continue
        chunks.append(b)
        total += len(b)
        if total >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


def stdlib_corpus(max_bytes: int = 4_000_000) -> bytes:
    """The first ``max_bytes`` of the standard library's source, in a fixed file order."""
    data = _read_files(_stdlib_files(), max_bytes)
    if len(data) < 10_000:
        raise RuntimeError("could not find the Python standard library sources on this machine")
    return data


def text_corpus(path: str, max_bytes: int) -> bytes:
    p = Path(path).expanduser()
    if p.is_file():
        data = p.read_bytes()[:max_bytes]
    elif p.is_dir():
        files = sorted((f for f in p.rglob("*") if f.is_file()), key=lambda f: f.relative_to(p).as_posix())
        data = _read_files(files, max_bytes)
    else:
        raise ConfigError(f"data.path: {path!r} is neither a file nor a directory")
    return data


class Dataset:
    """What the training loop needs from a data source."""

    vocab_size: int
    meta: dict

    def batch(self, split: str, seed: int, step: int, batch_size: int, seq_len: int,
              device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        raise NotImplementedError


def _generator(seed: int, step: int, split: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 7919 + (0 if split == "train" else 1)) % (2**63 - 1))
    return g


class TokenDataset(Dataset):
    """A byte stream cut into chunks of ``chunk`` bytes; every k-th chunk (k = 1 / val_frac) is
    validation, the rest training, so both splits sample the whole corpus."""

    def __init__(self, data: bytes, val_frac: float, meta: dict, chunk: int = 16384):
        arr = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64))
        k = max(2, round(1.0 / val_frac))
        chunk = max(256, min(chunk, len(arr) // (2 * k)))
        n_chunks = max(1, len(arr) // chunk)
        is_val = torch.zeros(len(arr), dtype=torch.bool)
        for i in range(k - 1, n_chunks, k):
            is_val[i * chunk : (i + 1) * chunk] = True
        self.train, self.val = arr[~is_val], arr[is_val]
        self.vocab_size = 256
        self.meta = dict(meta, n_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())

    def batch(self, split, seed, step, batch_size, seq_len, device="cpu"):
        data = self.train if split == "train" else self.val
        if len(data) <= seq_len + 1:
            raise ConfigError(f"data: the {split} split has {len(data)} tokens, too few for seq_len {seq_len}")
        ix = torch.randint(len(data) - seq_len - 1, (batch_size,), generator=_generator(seed, step, split))
        offs = torch.arange(seq_len + 1)
        chunk = data[ix[:, None] + offs[None, :]]  # (B, T+1)
        x, y = chunk[:, :-1], chunk[:, 1:]
        return x.to(device), y.to(device)


class ModularDataset(Dataset):
    """All pairs (a, b) of Z_p with label (a op b) mod p; token ``p`` is '='.

    ``batch`` returns ``x = [a, b, =]`` and ``y = [-1, -1, c]`` (only the last position is
    scored). ``batch_size <= 0`` or larger than the split means the full split (full-batch GD,
    the Prieto et al. setup); otherwise a seeded sample without replacement per step.
    """

    def __init__(self, p: int, op: str, train_frac: float, split_seed: int):
        a = torch.arange(p).repeat_interleave(p)
        b = torch.arange(p).repeat(p)
        c = {"add": (a + b) % p, "sub": (a - b) % p, "mul": (a * b) % p}[op]
        x = torch.stack([a, b, torch.full_like(a, p)], dim=1)
        y = torch.stack([torch.full_like(a, -1), torch.full_like(a, -1), c], dim=1)
        g = torch.Generator().manual_seed(split_seed)
        perm = torch.randperm(p * p, generator=g)
        n_train = int(round(train_frac * p * p))
        tr, va = perm[:n_train], perm[n_train:]
        self.x = {"train": x[tr], "val": x[va]}
        self.y = {"train": y[tr], "val": y[va]}
        self.vocab_size = p + 1
        self.meta = dict(source="modular", p=p, op=op, train_frac=train_frac, n_train=n_train, n_val=p * p - n_train)

    def batch(self, split, seed, step, batch_size, seq_len, device="cpu"):
        x, y = self.x[split], self.y[split]
        if 0 < batch_size < len(x):
            ix = torch.randperm(len(x), generator=_generator(seed, step, split))[:batch_size]
            x, y = x[ix], y[ix]
        return x.to(device), y.to(device)


def load_dataset(cfg: DataConfig) -> Dataset:
    """Build the dataset a :class:`DataConfig` describes."""
    cfg.validate()
    if cfg.source == "modular":
        return ModularDataset(cfg.p, cfg.op, cfg.train_frac, cfg.split_seed)
    if cfg.source == "stdlib":
        import sys

        data = stdlib_corpus(cfg.max_bytes)
        meta = dict(source="stdlib", python=sys.version.split()[0])
    else:
        data = text_corpus(cfg.path, cfg.max_bytes)
        if len(data) < 2048:
            raise ConfigError(f"data.path: {cfg.path!r} holds only {len(data)} bytes; need at least 2048")
        meta = dict(source="text", path=str(cfg.path))
    return TokenDataset(data, cfg.val_frac, meta)
