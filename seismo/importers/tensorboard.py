"""TensorBoard event files, read with TensorBoard's own reader (the ``tb`` extra)."""

from __future__ import annotations

from pathlib import Path

from seismo.importers.errors import ImportFormatError
from seismo.importers.tabular import Columns

__all__ = ["read_tensorboard"]


def read_tensorboard(path: Path) -> Columns:
    """Every scalar tag of an event file, or of the event files in a directory (one run)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
    except ImportError:  # an optional extra
        raise ImportFormatError(path, "reading TensorBoard files needs the tensorboard package: pip install 'seismo[tb]'") from None
    acc = EventAccumulator(str(path), size_guidance={SCALARS: 0})
    try:
        acc.Reload()
    except Exception as exc:  # noqa: BLE001 - TensorBoard's reader raises many types for a corrupt file; reported as one line
        raise ImportFormatError(path, f"not a readable TensorBoard event file: {type(exc).__name__}: {exc}") from None
    tags = acc.Tags().get("scalars", [])
    if not tags:
        raise ImportFormatError(path, "no scalar summaries in this TensorBoard file or directory")
    out: Columns = {}
    for tag in tags:
        events = acc.Scalars(tag)
        out[tag] = ([int(e.step) for e in events], [float(e.value) for e in events])
    return out
