"""``import_run``: read a run recorded elsewhere, rename its columns, store it in one transaction."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from seismo.importers.errors import ImportFormatError
from seismo.importers.tabular import Columns, read_csv, read_json_records
from seismo.importers.tensorboard import read_tensorboard
from seismo.store import COMPLETED, RunStore

__all__ = ["FORMATS", "ImportedRun", "read_run", "store_run", "import_run", "parse_mapping"]

FORMATS = ("csv", "jsonl", "tensorboard", "wandb")

_WANDB_SKIP = ("_runtime", "_timestamp", "_wandb")


@dataclass
class ImportedRun:
    """A run read from a file: ``metrics`` is ``{seismo name: (steps, values)}``."""

    path: str
    format: str
    metrics: dict[str, tuple[list[int], list[float]]]
    renamed: dict[str, str] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return max((len(s) for s, _ in self.metrics.values()), default=0)


def parse_mapping(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["loss=train/lm_loss", ...]`` (the CLI's ``--map``) as ``{"loss": "train/lm_loss"}``."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, source = item.partition("=")
        if not sep or not name.strip() or not source.strip():
            raise ImportFormatError("--map", f"{item!r} is not NAME=COLUMN (e.g. loss=train/lm_loss)")
        out[name.strip()] = source.strip()
    return out


def _guess_format(path: Path) -> str:
    if path.is_dir() or ".tfevents." in path.name:
        return "tensorboard"
    suffixes = [s for s in path.suffixes if s != ".gz"]
    ext = suffixes[-1] if suffixes else ""
    if ext == ".csv":
        return "csv"
    if ext in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    raise ImportFormatError(path, "cannot tell the format from the name: give format= (--format) csv, jsonl, tensorboard or wandb")


def read_run(path: str | os.PathLike, format: str | None = None, mapping: Mapping[str, str] | None = None) -> ImportedRun:
    """Read ``path`` as ``format`` (guessed from the name when None) and rename columns by ``mapping``
    (``{seismo name: source column}``; a mapped ``step`` names the step column). Other numeric
    columns keep their names."""
    p = Path(path)
    if not p.exists():
        raise ImportFormatError(p, "no such file or directory")
    fmt = format or _guess_format(p)
    if fmt not in FORMATS:
        raise ImportFormatError(p, f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    mapping = dict(mapping or {})
    step_column = mapping.pop("step", None)
    if fmt == "tensorboard":
        cols: Columns = read_tensorboard(p)
    elif fmt == "wandb":
        reader = read_csv if [s for s in p.suffixes if s != ".gz"][-1:] == [".csv"] else read_json_records
        cols = reader(p, step_column or "_step", skip=_WANDB_SKIP, lenient=True)
    elif fmt == "csv":
        cols = read_csv(p, step_column)
    else:
        cols = read_json_records(p, step_column)
    missing = [src for src in mapping.values() if src not in cols]
    if missing:
        raise ImportFormatError(p, f"--map: no column {missing[0]!r} in the file (columns: {', '.join(sorted(cols)[:12])})")
    inverse = {src: name for name, src in mapping.items()}
    metrics = {inverse.get(k, k): v for k, v in cols.items()}
    if not metrics:
        raise ImportFormatError(p, "no numeric columns to import")
    return ImportedRun(str(p), fmt, metrics, {src: name for name, src in mapping.items()})


def import_run(path: str | os.PathLike, format: str | None = None, mapping: Mapping[str, str] | None = None,
               run_name: str | None = None, store: str | os.PathLike = "runs/seismo.sqlite") -> int:
    """Read ``path`` (see :func:`read_run`) and write it to the run store ``store`` as a completed run,
    all rows in one transaction. Returns the new run id."""
    return store_run(read_run(path, format, mapping), run_name, store)


def store_run(run: ImportedRun, run_name: str | None = None, store: str | os.PathLike = "runs/seismo.sqlite") -> int:
    """Write a run read by :func:`read_run` to ``store`` in one transaction; returns its run id."""
    name = run_name or Path(run.path).name.split(".")[0]
    rows = [(s, k, v) for k, (steps, vals) in run.metrics.items() for s, v in zip(steps, vals)]
    Path(store).parent.mkdir(parents=True, exist_ok=True)
    with RunStore(store) as rs:
        return rs.record_run(name, config=None, status=COMPLETED, metrics=rows,
                             meta={"imported_from": os.path.abspath(run.path), "format": run.format, "renamed": run.renamed})
