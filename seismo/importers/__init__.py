"""Bring runs recorded elsewhere into the run store: CSV, JSON lines, TensorBoard, W&B exports.

``import_run(path, format=..., mapping={"loss": "train/lm_loss"}, run_name=..., store=...)``
reads the file, renames the mapped columns to seismo's signal names (``loss``, ``grad/norm``,
...), and writes the whole run in one transaction: a bad file leaves nothing behind, and says
which file, line and column is wrong. Then ``seismo diagnose`` and the report work on it.
"""

from seismo.importers.errors import ImportFormatError
from seismo.importers.importer import FORMATS, ImportedRun, import_run, read_run

__all__ = ["import_run", "read_run", "ImportedRun", "ImportFormatError", "FORMATS"]
