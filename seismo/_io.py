"""Atomic file writes and JSON encoding, shared by every part of seismo that writes files.

A write goes to a temporary file in the target's directory, is flushed and fsync'ed, renamed over
the target (``os.replace`` is atomic on POSIX and Windows), and the directory is fsync'ed: a crash
at any point leaves the old file or the new one, never a torn one.
"""

from __future__ import annotations

import enum
import json
import os
import threading
from pathlib import Path
from typing import IO, Any, Callable

__all__ = ["fsync_dir", "atomic_write", "atomic_write_text", "atomic_write_json", "atomic_torch_save", "json_default", "dumps_json"]


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that a rename in it is durable (best effort)."""
    # Some filesystems (and Windows) cannot open a directory; the rename is still atomic there.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not supported on this filesystem: durability of the rename is best effort
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary binary file, then move it over ``path`` atomically.

    The parent directory must exist. On any error the temporary file is removed and the old
    ``path`` (if any) is left untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass  # never created, or already gone
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def json_default(obj: Any) -> Any:
    """Encode what ``json`` cannot: numpy/torch values (``tolist``), enums, paths, sets, tuples.

    Anything else becomes its ``repr``, so odd evidence never makes a write fail.
    """
    if isinstance(obj, enum.Enum):
        return obj.value
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        try:
            return obj.tolist()
        except (TypeError, ValueError, RuntimeError):
            return repr(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    return repr(obj)


def dumps_json(value: Any, *, indent: int | None = None, sort_keys: bool = False) -> str:
    """``json.dumps`` with :func:`json_default`; non-finite floats are written as NaN/Infinity."""
    return json.dumps(value, default=json_default, indent=indent, sort_keys=sort_keys, allow_nan=True)


def atomic_write_json(path: str | os.PathLike, value: Any, *, indent: int | None = 2) -> Path:
    """Write ``value`` as JSON to ``path`` atomically."""
    return atomic_write_text(path, dumps_json(value, indent=indent))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch  # torch is a core dependency; imported here so the JSON helpers stay light

    return atomic_write(path, lambda f: torch.save(obj, f))
