"""Writing result files safely: checked before any work, written to a temporary file beside the
target, then renamed over it, so that a result file is whole or absent and never an input.

Temporary files are named `.NAME.PID.TOKEN.tmp` (PID: the writer's process id) and created with
mode 0666 less the umask, like any other tool's files. A writer killed mid-write (kill -9) leaves
its temporary file; the next write to the same target removes it, once its writer is gone.
Under torchrun only the main process writes; the other processes' files are discarded.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Sequence

from .distributed import is_main
from .errors import DsqError, os_reason

PathLike = str | os.PathLike


def check_writable(path: PathLike) -> Path:
    """DsqError now, before any work, if a result could not be written to `path` later (a probe
    file is created and removed beside it); returns the path written, symlinks followed."""
    if not os.path.basename(path):  # '', 'out/', '/'
        raise DsqError(f"cannot write {str(path)!r}: give a file name, not a folder")
    target = Path(os.path.realpath(path))
    if target.is_dir():
        raise DsqError(f"{path} is a folder: give a file name to write")
    folder = target.parent
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise DsqError(f"cannot write {path}: folder {folder} {what}")
    if target.exists() and not target.is_file():  # renaming over it would replace a device or pipe
        raise DsqError(f"cannot write {path}: it is a device, pipe or socket, not a file; give a file name")
    if target.exists() and is_read_only(target):
        raise DsqError(f"cannot write {path}: the file is read-only; make it writable or write elsewhere")
    try:
        with _temp_file(target):
            pass
    except OSError as error:
        raise DsqError(f"cannot write {path}: {os_reason(error)}") from None
    return target


def is_read_only(path: Path) -> bool:
    """True for a file this process may not write or that nobody may (no w bit: so even for root)."""
    return not os.access(path, os.W_OK) or not path.stat().st_mode & 0o222


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether `a` and `b` name one file however spelt: ./ and .., symlinks, hard links."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def is_inside(path: PathLike, folder: PathLike) -> bool:
    """Whether `path` lies in the existing folder `folder` (at any depth, symlinks followed)."""
    return os.path.isdir(folder) and Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


def check_outputs(outputs: Sequence[PathLike], inputs: Sequence[PathLike] = ()) -> None:
    """DsqError now, before any work, unless every output can be written and none would destroy
    an input (the same file, or a file in an input folder) or another output."""
    for index, output in enumerate(outputs):
        for earlier in outputs[:index]:
            if same_file(output, earlier):
                raise DsqError(f"outputs {earlier} and {output} are the same file: give each output its own name")
        for source in inputs:
            if same_file(output, source):
                raise DsqError(f"output {output} would overwrite input {source}: write the result elsewhere")
            if is_inside(output, source):
                raise DsqError(f"output {output} is inside input folder {source}: write the result elsewhere")
        check_writable(output)


@contextlib.contextmanager
def atomic_path(path: PathLike):
    """Yield a temporary path beside `path` to write; on success it replaces `path`, on failure or
    Ctrl-C it is removed. An OSError meanwhile (full disk, file too large, ...) is a DsqError."""
    target = check_writable(path)
    remove_stale_temp_files(target)
    try:
        with _temp_file(target) as tmp:
            mode = stat.S_IMODE(os.stat(tmp).st_mode)
            yield str(tmp)
            os.chmod(tmp, mode)  # a writer may have replaced it by a file of its own (safetensors: 0600)
            if is_main():
                os.replace(tmp, target)
    except OSError as error:
        raise DsqError(f"cannot write {path}: {os_reason(error)}") from None


@contextlib.contextmanager
def _temp_file(target: Path):
    """A new empty file `.NAME.PID.TOKEN.tmp` beside `target`, removed on exit unless renamed."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies
    try:
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def remove_stale_temp_files(target: Path) -> None:
    """Remove the temporary files of `target` whose writers are gone (killed mid-write);
    a live writer's are left alone."""
    pattern = re.compile(re.escape(f".{target.name}.") + r"(\d{1,7})\.[0-9a-f]{8}\.tmp")
    with os.scandir(target.parent) as entries:
        stale = [e.path for e in entries if (found := pattern.fullmatch(e.name)) and not _alive(int(found[1]))]
    for tmp in stale:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def write_text(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_json(path: PathLike, data) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_csv(path: PathLike, rows: list[dict]) -> None:
    """`rows` (dicts with the same keys) as CSV with a header line."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, out.getvalue())
