"""Fixtures for the CLI tests: every test runs the real ``seismo.cli.main`` in-process."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich tables on one line each
    monkeypatch.delenv("SEISMO_DEBUG", raising=False)
