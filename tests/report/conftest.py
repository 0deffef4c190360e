"""Fixtures of the report tests (the synthetic data lives in report_data.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def store_path(tmp_path) -> Path:
    return tmp_path / "runs" / "seismo.sqlite"
