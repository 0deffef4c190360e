"""The PolyPythia per-step loss logs (read from ``../shared/data/pythia`` or a given path; never copied)."""

from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DEFAULT_DATA", "LABELS", "Label", "load_loss", "load_labels", "runs"]

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pythia"
LABELS = Path(__file__).resolve().parent / "labels" / "pythia.csv"


@dataclass(frozen=True)
class Label:
    run: str
    kind: str  # spike, bump, level_shift, drift, blip, turbulent
    onset: int
    end: int
    peak_nats: float | None
    note: str


def runs(data: Path) -> list[str]:
    names = sorted(p.name[: -len(".csv.gz")] for p in data.glob("*.csv.gz"))
    if not names:
        raise SystemExit(f"no PolyPythia logs (*.csv.gz) in {data}: give --data")
    return names


def load_loss(data: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(data / f"{name}.csv.gz", "rt") as f:
        a = np.loadtxt(f, delimiter=",", skiprows=1)
    return a[:, 0].astype(np.int64), a[:, 1]


def load_labels(path: Path = LABELS) -> list[Label]:
    with open(path, newline="") as f:
        return [Label(r["run"], r["kind"], int(r["onset"]), int(r["end"]), float(r["peak_nats"]) if r["peak_nats"] else None, r["note"])
                for r in csv.DictReader(f)]
