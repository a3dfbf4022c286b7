"""Reading the launcher's JSONL data files, with errors that name the file and the line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class DataFileError(ValueError):
    """A data file that cannot be read; the message names the file and the line (or row)."""


def read_jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(`"<file>:<line>"`, record) for each non-blank line of a JSONL file.

    A missing file or a line that is not JSON raises `DataFileError` naming the file and line; checking
    each record's fields is the caller's job, which gets the location string for its own errors.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: no such file")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFileError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            yield f"{path}:{lineno}", record
