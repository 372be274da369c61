"""Class lists: the class name of every label, from a list or a text file (line i = class i)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

from ..errors import DsqError

_WNID = re.compile(r"n\d{8}")
_WNID_LINE = re.compile(r"(n\d{8})\s")

ClassList = Sequence[str] | str | os.PathLike

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def is_wnid(name: str) -> bool:
    """True for an ImageNet WordNet id such as 'n01440764'."""
    return _WNID.fullmatch(name) is not None


def is_model_class_order(names: Sequence[str]) -> bool:
    """True when sorted folder names are the class order models predict: CIFAR-10's names, or ImageNet wnids."""
    return tuple(names) == CIFAR10_CLASSES or (bool(names) and all(map(is_wnid, names)))


def _read_file(path: Path) -> list[str]:
    if not path.exists():
        raise DsqError(f"class list {path} does not exist: pass a text file with one class name per line")
    if not path.is_file():
        raise DsqError(f"class list {path} is not a file: pass a text file with one class name per line")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    except (OSError, UnicodeDecodeError) as error:
        raise DsqError(f"cannot read class list {path}: {' '.join(str(error).split())}") from None
    while lines and not lines[-1]:
        lines.pop()
    for number, line in enumerate(lines, 1):
        if not line:
            raise DsqError(f"line {number} of class list {path} is empty: line i must name class i, remove blank lines")
    # 'n01440764 tench, Tinca tinca' (synset_words.txt style) names the wnid.
    return [m.group(1) if (m := _WNID_LINE.match(line)) else line for line in lines]


def read_classes(classes: ClassList) -> list[str]:
    """Class names in label order, from a list of names or a path to a text file with one per line."""
    if isinstance(classes, (str, os.PathLike)):
        where = f"class list {classes}"
        names = _read_file(Path(classes))
    else:
        where = "the class list"
        names = [str(name) for name in classes]
    if not names:
        raise DsqError(f"{where} is empty: it must name one class per line, line i = class i")
    seen = set()
    for name in names:
        if name in seen:
            raise DsqError(f"{where} names class {name!r} twice: every class must appear once")
        seen.add(name)
    return names
