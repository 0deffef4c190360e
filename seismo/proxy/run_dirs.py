"""Run directories: a run's name is data, its directory a safe slug of that name.

``seismo train --name NAME --out OUT`` writes into ``OUT/run_dir_name(NAME)``. The slug keeps
letters, digits, ``.``, ``_`` and ``-``; every other run of characters (``/``, ``\\``, spaces,
``[`` ...) becomes ``_``, runs of dots become one dot, leading dots and hyphens are dropped (no
``..``, no hidden directory, no option-like name), and a name that had to change gets an
8-hex-digit hash of the original, so two different names never share a directory. The name
itself is stored verbatim in the run store.

Names that cannot be made safe are refused with a one-line :class:`~seismo.errors.ConfigError`:
blank names, names made only of dots and hyphens (``.``, ``..``), names with control characters
(terminal escape sequences), and names longer than :data:`MAX_NAME_CHARS`.

:class:`RunDirLock` keeps two processes from writing the same run directory at once.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from pathlib import Path

from seismo.errors import ConfigError

try:  # POSIX advisory locks; released by the kernel when the process dies, even by kill -9
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["MAX_NAME_CHARS", "LOCK_FILE", "run_dir_name", "RunDirLock"]

MAX_NAME_CHARS = 200
LOCK_FILE = ".seismo.lock"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


def run_dir_name(name: str, field: str = "run_name") -> str:
    """The directory name for the run called ``name``: ``name`` itself when it is already a safe
    file name, else its slug plus a hash of ``name``. Raises :class:`ConfigError` naming ``field``
    when no safe name can be made."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{field}: a run name must not be empty")
    if len(name) > MAX_NAME_CHARS:
        raise ConfigError(f"{field}: a run name has at most {MAX_NAME_CHARS} characters, got {len(name)}")
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise ConfigError(f"{field}: a run name must not contain control characters, got {name!r}")
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"\.{2,}", ".", _UNSAFE.sub("_", ascii_name)).lstrip(".-").rstrip(".")
    if not slug:
        raise ConfigError(f"{field}: {name!r} cannot name a directory (only dots, hyphens or spaces); use a letter or digit")
    if slug == name and slug.split(".")[0].upper() not in _WINDOWS_RESERVED:
        return name
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
    return f"{slug[:100]}-{digest}"


class RunDirLock:
    """An exclusive lock on a run directory, held while a run writes into it.

    ``with RunDirLock(path, name):`` creates ``path`` (and its parents) and locks
    ``path/.seismo.lock``; a second process that tries while the first holds it gets a
    :class:`ConfigError` naming ``--name``. The lock dies with its process (``flock``), so a run
    killed with SIGKILL never leaves a stale lock behind. Where ``fcntl`` is missing (Windows) the
    lock is a no-op.
    """

    def __init__(self, path: str | os.PathLike, name: str = "", field: str = "--name"):
        self.path = Path(path)
        self.name = name or self.path.name
        self.field = field
        self._fd: int | None = None

    def acquire(self) -> "RunDirLock":
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{self.field}: cannot create the run directory {self.path}: {exc.strerror or exc}") from None
        if fcntl is None:  # pragma: no cover
            return self
        lock = self.path / LOCK_FILE
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"{self.field}: the run {self.name!r} is being written by another process ({lock} is locked); "
                "wait for it or choose another name"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
