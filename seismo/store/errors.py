"""The run store's two failure types: an error for callers, a warning for the background writer."""

from __future__ import annotations

__all__ = ["StoreError", "StoreWriteWarning"]


class StoreError(Exception):
    """Raised for any failure of the run store (I/O, schema, bad input, missing run)."""


class StoreWriteWarning(RuntimeWarning):
    """Emitted (once per writer) when an :class:`~seismo.store.AsyncWriter` stops writing."""
