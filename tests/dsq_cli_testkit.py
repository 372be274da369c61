"""Helpers of the `dsq` command-line tests (imported by name: tests/ is on sys.path).

A CliRunner call of the `dsq` group, parsers for the printed tables, and the checks every user
error must pass; the real data's paths come from conftest (re-exported for the CLI tests).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner, Result

from dsq.cli import cli

from conftest import CIFAR, IMAGENET_DEV, RESNET20, WNIDS, need  # noqa: F401 (re-exported)

# Images per evaluation in the shared quantize run and everything compared with it.
LIMIT = 200
# The 20 conv layers of ResNet-20 (conv1 + 3 stages x 3 blocks x 2 convs) and its classifier.
RESNET20_CONVS = ["conv1"] + [f"layer{s}.{b}.conv{c}" for s in (1, 2, 3) for b in range(3) for c in (1, 2)]


def run_dsq(*args) -> Result:
    """`dsq ARGS...` in-process; stdout and stderr are kept apart (result.stdout / result.stderr)."""
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="dsq")


# ---- reading what the commands print ------------------------------------------------------


def table_rows(text: str, first_header: str) -> dict[str, list[str]]:
    """Rows of the first table whose header line starts with `first_header`, keyed by first column.

    Tables are `report._table` layouts: header, a dashed rule, rows, then a blank line or the end.
    """
    lines = text.splitlines()
    start = next(
        i for i, line in enumerate(lines[:-1]) if line.split()[:1] == [first_header] and _is_rule(lines[i + 1])
    )
    rows = {}
    for line in lines[start + 2 :]:
        if not line.strip() or line.startswith(("wrote ", "warning")):
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells[1:]
    return rows


def _is_rule(line: str) -> bool:
    return set(line.replace(" ", "")) == {"-"}


@dataclass
class Acc:
    top1: str
    top5: str
    images: int


def accuracy_rows(text: str) -> dict[str, Acc]:
    """The accuracy table ('model  top-1 %  top-5 %  top-1 change  images') as printed strings."""
    rows = {}
    for name, cells in table_rows(text, "model").items():
        # the float row has an empty 'top-1 change' cell, which the split drops
        rows[name] = Acc(cells[0], cells[1], int(cells[-1]))
    return rows


# ---- user errors ---------------------------------------------------------------------------

INFO_PREFIXES = ("data: ",)  # what the commands say on stderr before they read the images


def error_line(result: Result, *keywords: str, usage: bool = False) -> str:
    """Check `result` is a clean user error and return its `Error: ...` line.

    Exit code non-zero, no exception other than the exit, no traceback, nothing on stdout, and
    on stderr exactly one non-empty line that starts with 'Error:' and names every keyword
    (case-insensitive). Besides it, stderr may hold the one-line 'data: ...' note, and for a
    click usage error (`usage=True`, exit 2) click's 'Usage:'/'Try ...' lines.
    """
    everything = result.output
    assert result.exit_code != 0, everything
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"uncaught {type(result.exception).__name__}: {result.exception}\n{everything}"
    )
    assert "Traceback" not in everything, everything
    if usage:
        assert result.exit_code == 2, everything
    assert result.stdout.strip() == "", f"stdout of a failed command: {result.stdout!r}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1, lines
    others = [line for line in lines if line not in errors and not line.startswith(INFO_PREFIXES)]
    if usage:
        others = [line for line in others if not line.startswith(("Usage: dsq", "Try 'dsq"))]
    assert others == [], f"more than one line of error output: {lines}"
    line = errors[0]
    assert len(line) > len("Error: ") + 10, line
    for keyword in keywords:
        assert keyword.lower() in line.lower(), f"{keyword!r} not in {line!r}"
    return line


def folder_listing(folder: Path) -> list[str]:
    """Every name in `folder`, hidden ones (temporary files) included."""
    return sorted(os.listdir(folder))
