"""Loading a training checkpoint for ``--resume``, with a one-line error for every way it can be wrong.

:func:`load_resume_checkpoint` is what :func:`seismo.proxy.train.train` calls before it restores a
run; :func:`check_resume_checkpoint` is the same check without a model (the CLI runs it before any
data is loaded). Each problem is a :class:`~seismo.errors.ConfigError` that names it:

* missing, empty, truncated or corrupt files (``torch.load`` raising ``EOFError``,
  ``RuntimeError``, a bad zip archive);
* foreign files: anything ``torch.load(weights_only=True)`` refuses to unpickle (never executed),
  or a loadable object that is not a seismo training checkpoint (the missing keys are named);
* a different config: the checkpoint's run (its ``config`` entry, else the ``config.json`` next to
  it) differs from the run being resumed in fields that change the training: the fields are named
  with both values;
* a different model: parameter names or shapes that do not match the model, or optimizer
  parameter groups that do not match the optimizer (the first mismatches are named).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from seismo.errors import ConfigError

__all__ = ["REQUIRED_KEYS", "RESUMABLE_CHANGES", "check_resume_checkpoint", "load_resume_checkpoint", "config_differences"]

REQUIRED_KEYS = ("step", "model", "optim", "rng", "losses", "val")
# Fields a resumed run may change: where files go, when to stop, how often to checkpoint.
RESUMABLE_CHANGES = frozenset({"run_name", "out_dir", "store", "stop_at", "checkpoint_every", "checkpoint_keep", "device"})
_MAX_NAMED = 3
# Fields added after checkpoints were first written, with the value older runs had implicitly: a
# checkpoint whose saved config lacks one is compared as if it had that value (still resumable).
ADDED_FIELDS: dict[str, Any] = {"spikes.poison_steps": [], "spikes.lr_burst_steps": [], "spikes.lr_burst_factor": 50.0,
                                "qk_clip": 0.0}


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], ignore=RESUMABLE_CHANGES) -> list[tuple[str, Any, Any]]:
    """``(dotted field, saved value, current value)`` for every field that differs, ``ignore`` excepted."""
    a, b = _flatten(saved), _flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in ignore:
            continue
        va, vb = a.get(key, ADDED_FIELDS.get(key, "<missing>")), b.get(key, "<missing>")
        if isinstance(va, (list, tuple)) and isinstance(vb, (list, tuple)):
            va, vb = list(va), list(vb)
        if va != vb:
            diffs.append((key, va, vb))
    return diffs


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"resume: no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise ConfigError(f"resume: the checkpoint {path} is empty (0 bytes)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is a paragraph; its "Unsupported global: GLOBAL x" names what a foreign
        # pickle asked for (never executed). Any other unpickling failure is damage.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found:
            raise ConfigError(f"resume: {path} is not a seismo checkpoint (refused by torch.load(weights_only=True): "
                              f"it needs {found.group(1)[:80]})") from None
        raise ConfigError(f"resume: the checkpoint {path} is corrupt or truncated (it does not unpickle)") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"resume: the checkpoint {path} is corrupt or truncated ({type(exc).__name__}: {first[:160]})") from None
    if not isinstance(ck, dict):
        raise ConfigError(f"resume: {path} is not a seismo checkpoint (it holds a {type(ck).__name__}, not a dict)")
    missing = [k for k in REQUIRED_KEYS if k not in ck]
    if missing:
        raise ConfigError(f"resume: {path} is not a seismo checkpoint (missing {', '.join(missing)})")
    if not isinstance(ck["model"], Mapping) or not isinstance(ck["optim"], Mapping):
        raise ConfigError(f"resume: {path} is not a seismo checkpoint (model or optim is not a state dict)")
    return ck


def _saved_config(ck: Mapping[str, Any], path: Path) -> dict | None:
    if isinstance(ck.get("config"), Mapping):
        return dict(ck["config"])
    sidecar = path.parent / "config.json"
    try:
        return json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None


def _check_config(ck: Mapping[str, Any], path: Path, config: Mapping[str, Any], ignore: frozenset[str]) -> None:
    saved = _saved_config(ck, path)
    if saved is None:
        return
    diffs = config_differences(saved, config, ignore)
    if diffs:
        shown = "; ".join(f"{k} {a!r} -> {b!r}" for k, a, b in diffs[:_MAX_NAMED])
        more = f" (and {len(diffs) - _MAX_NAMED} more)" if len(diffs) > _MAX_NAMED else ""
        raise ConfigError(
            f"resume: the checkpoint's run was trained with a different config: {shown}{more}; "
            "resume with the same settings, or start a new run under another --name"
        )


def _check_step(ck: Mapping[str, Any], path: Path, steps: int | None) -> None:
    step = ck["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ConfigError(f"resume: {path} has an invalid step {step!r}")
    if steps is not None and step > steps:
        raise ConfigError(f"resume: {path} is at step {step}, beyond this run's steps={steps}")
    losses = ck["losses"]
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or losses.numel() < step:
        raise ConfigError(f"resume: {path} is damaged (its loss history does not cover its {step} steps)")
    rng = ck["rng"]
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8:
        raise ConfigError(f"resume: {path} is damaged (rng is not a torch RNG state)")


def _shape(t: Any) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_model(ck: Mapping[str, Any], path: Path, model: torch.nn.Module) -> None:
    want = model.state_dict()
    have = ck["model"]
    problems = [f"{k} is missing" for k in want if k not in have]
    problems += [f"{k} is not in the model" for k in have if k not in want]
    problems += [f"{k} has shape {_shape(have[k])} in the checkpoint, {_shape(want[k])} in the model"
                 for k in want if k in have and (not isinstance(have[k], torch.Tensor) or have[k].shape != want[k].shape)]
    if problems:
        more = f" (and {len(problems) - _MAX_NAMED} more)" if len(problems) > _MAX_NAMED else ""
        raise ConfigError(f"resume: {path} does not fit the model: {'; '.join(problems[:_MAX_NAMED])}{more}")


def _check_optimizer(ck: Mapping[str, Any], path: Path, optimizer: torch.optim.Optimizer) -> None:
    groups = ck["optim"].get("param_groups")
    if not isinstance(groups, list) or "state" not in ck["optim"]:
        raise ConfigError(f"resume: {path} is damaged (optim is not an optimizer state dict)")
    have = [len(g.get("params", ())) if isinstance(g, Mapping) else -1 for g in groups]
    want = [len(g["params"]) for g in optimizer.param_groups]
    if have != want:
        raise ConfigError(f"resume: {path} does not fit the optimizer: parameter groups of sizes {have} in the checkpoint, {want} here")


def check_resume_checkpoint(path: str | os.PathLike, config: Mapping[str, Any] | None = None,
                            ignore: frozenset[str] = RESUMABLE_CHANGES) -> dict[str, Any]:
    """Load ``path`` and check it is a readable seismo checkpoint of the run ``config`` (a
    ``TrainConfig.to_dict()``), comparing every field but ``ignore``; returns the checkpoint.
    Raises :class:`ConfigError` naming the problem."""
    path = Path(path)
    ck = _load(path)
    if config is not None:
        _check_config(ck, path, config, ignore)
    _check_step(ck, path, config.get("steps") if config is not None else None)
    return ck


def load_resume_checkpoint(path: str | os.PathLike, config: Mapping[str, Any], model: torch.nn.Module,
                           optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """:func:`check_resume_checkpoint`, then check it fits ``model`` and ``optimizer`` and load both
    states into them; returns the checkpoint (step, losses, rng, ...) for the caller to restore the rest."""
    path = Path(path)
    ck = check_resume_checkpoint(path, config)
    _check_model(ck, path, model)
    _check_optimizer(ck, path, optimizer)
    try:
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optim"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"resume: {path} does not fit this run ({type(exc).__name__}: {first[:200]})") from None
    return ck
