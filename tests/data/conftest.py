"""Paths to the real shared data (read in place, never copied into the repo) and small helpers."""

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CIFAR = SHARED / "cifar10-test"
WNIDS = SHARED / "imagenet-wnids.txt"
IMAGENET_DEV = SHARED / "imagenet-samples-dev"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data missing: {path}")
    return path


def link(src: Path, dst: Path) -> Path:
    """Symlink a real image into a tmp layout (falls back to a copy where symlinks are not allowed)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        dst.symlink_to(src)
    except OSError:
        dst.write_bytes(src.read_bytes())
    return dst


def one_line(error) -> str:
    message = str(error.value)
    assert message and "\n" not in message, repr(message)
    return message
