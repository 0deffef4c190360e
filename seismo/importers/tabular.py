"""CSV, JSON-lines and JSON-records readers (and W&B's exports of ``run.history()``, which are one
of these with a ``_step`` column and bookkeeping columns that start with ``_``)."""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from pathlib import Path
from typing import IO, Iterator

from seismo.importers.errors import ImportFormatError

__all__ = ["Columns", "read_csv", "read_jsonl", "read_json_records"]

#: ``{column: (steps, values)}`` as read, before renaming.
Columns = dict[str, tuple[list[int], list[float]]]

STEP_COLUMNS = ("step", "_step", "global_step", "iteration", "iter")


def _open(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _number(raw: object, path: Path, line: int, column: str) -> float | None:
    """A cell as a float; None for an empty cell; an error naming the place otherwise."""
    if raw is None or raw == "":
        return None
    if isinstance(raw, bool):
        return float(raw)
    if isinstance(raw, (int, float)):
        return float(raw)
    if isinstance(raw, str):
        try:
            return float(raw)
        except ValueError:
            pass
    raise ImportFormatError(path, f"column {column!r}: {str(raw)[:40]!r} is not a number", line, column)


def _step(raw: object, path: Path, line: int, column: str) -> int:
    v = _number(raw, path, line, column)
    if v is None or not math.isfinite(v) or v != int(v) or v < 0:
        raise ImportFormatError(path, f"step column {column!r}: {str(raw)[:40]!r} is not a non-negative integer", line, column)
    return int(v)


def _step_column(columns: list[str], path: Path, step_column: str | None) -> str | None:
    if step_column is not None:
        if step_column not in columns:
            raise ImportFormatError(path, f"no step column {step_column!r} (columns: {', '.join(columns[:12])})", 1)
        return step_column
    return next((c for c in STEP_COLUMNS if c in columns), None)


def _rows(path: Path, rows: Iterator[tuple[int, dict]], step_column: str | None, skip: tuple[str, ...],
          lenient: bool) -> Columns:
    out: Columns = {}
    for n, (line, row) in enumerate(rows):
        step = _step(row[step_column], path, line, step_column) if step_column and row.get(step_column) not in (None, "") else n
        for k, raw in row.items():
            if k == step_column or k is None or k.startswith(skip):
                continue
            try:
                v = _number(raw, path, line, k)
            except ImportFormatError:
                if lenient:  # W&B histories hold media and tables next to the scalars
                    continue
                raise
            if v is not None:
                steps, vals = out.setdefault(k, ([], []))
                steps.append(step)
                vals.append(v)
    return out


def read_csv(path: Path, step_column: str | None = None, skip: tuple[str, ...] = (), lenient: bool = False) -> Columns:
    """A CSV file with a header row (``.csv`` or ``.csv.gz``)."""
    with _open(path) as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise ImportFormatError(path, "the file is empty", 1) from None
        except csv.Error as exc:
            raise ImportFormatError(path, f"not CSV: {exc}", 1) from None
        header = [h.strip() for h in header]
        if len(set(header)) != len(header):
            dup = next(h for h in header if header.count(h) > 1)
            raise ImportFormatError(path, f"column {dup!r} appears twice in the header", 1)
        col = _step_column(header, path, step_column)

        def rows() -> Iterator[tuple[int, dict]]:
            try:
                for cells in reader:
                    if not cells:
                        continue
                    if len(cells) != len(header):
                        raise ImportFormatError(path, f"{len(cells)} cells where the header has {len(header)}", reader.line_num,
                                                min(len(cells), len(header)) + 1)
                    yield reader.line_num, dict(zip(header, cells))
            except csv.Error as exc:
                raise ImportFormatError(path, f"not CSV: {exc}", reader.line_num) from None

        return _rows(path, rows(), col, skip, lenient)


def _json_objects(path: Path) -> Iterator[tuple[int, dict]]:
    with _open(path) as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ImportFormatError(path, f"not JSON: {exc.msg}", line, exc.colno) from None
            if not isinstance(obj, dict):
                raise ImportFormatError(path, f"each line must be a JSON object, got {type(obj).__name__}", line, 1)
            yield line, obj


def read_jsonl(path: Path, step_column: str | None = None, skip: tuple[str, ...] = (), lenient: bool = False) -> Columns:
    """One JSON object per line (``.jsonl``, ``.jsonl.gz``)."""
    objs = list(_json_objects(path))
    keys = list(dict.fromkeys(k for _, o in objs for k in o))
    return _rows(path, iter(objs), _step_column(keys, path, step_column), skip, lenient)


def read_json_records(path: Path, step_column: str | None = None, skip: tuple[str, ...] = (), lenient: bool = False) -> Columns:
    """A JSON array of objects (pandas ``to_json(orient="records")``), or JSON lines."""
    with _open(path) as f:
        text = f.read()
    if not text.lstrip().startswith("["):
        return read_jsonl(path, step_column, skip, lenient)
    try:
        objs = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ImportFormatError(path, f"not JSON: {exc.msg}", exc.lineno, exc.colno) from None
    bad = next((i for i, o in enumerate(objs) if not isinstance(o, dict)), None)
    if bad is not None:
        raise ImportFormatError(path, f"record {bad} is a {type(objs[bad]).__name__}, not an object", 1)
    keys = list(dict.fromkeys(k for o in objs for k in o))
    return _rows(path, ((1, o) for o in objs), _step_column(keys, path, step_column), skip, lenient)
