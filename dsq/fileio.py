"""Writing result files safely: to a temporary file beside the target, then renamed.

Under torchrun only the main process writes; the other processes' files are discarded.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from pathlib import Path

from .distributed import is_main
from .errors import DsqError


def check_writable(path: str | os.PathLike) -> Path:
    """DsqError now, before any work, if a result could not be written to `path` later."""
    target = Path(path)
    if target.is_dir():
        raise DsqError(f"{target} is a folder: give a file name to write")
    if not target.parent.is_dir():
        raise DsqError(f"cannot write {target}: folder {target.parent} does not exist")
    if not os.access(target.parent, os.W_OK):
        raise DsqError(f"cannot write {target}: folder {target.parent} is not writable")
    return target


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path; on success it replaces `path`, on failure it is removed."""
    target = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield tmp
        if is_main():
            os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_json(path: str | os.PathLike, data) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    """`rows` (dicts with the same keys) as CSV with a header line."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, out.getvalue())
