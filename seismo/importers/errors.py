"""The one error an importer raises for a bad file."""

from __future__ import annotations

from seismo.errors import ConfigError

__all__ = ["ImportFormatError"]


class ImportFormatError(ConfigError):
    """A file that cannot be imported: ``<file>:<line>:<column>: <what is wrong>`` on one line."""

    def __init__(self, path: object, what: str, line: int | None = None, column: int | str | None = None):
        where = str(path) + (f":{line}" if line is not None else "") + (f":{column}" if column is not None else "")
        super().__init__(f"{where}: {what}")
        self.path, self.line, self.column = str(path), line, column
