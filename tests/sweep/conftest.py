"""Fixtures of the sweep, sensitivity and per-layer precision tests: ResNet-20 and CIFAR-10 (read in place)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
LIMIT = 100  # images per evaluation: enough to check the bookkeeping, small enough for 2 cores


@pytest.fixture(scope="session")
def resnet20():
    path = SHARED / "cifar10-resnet" / "resnet20-12fca82f.th"
    if not path.exists():
        pytest.skip(f"shared data missing: {path}")
    return path


@pytest.fixture(scope="session")
def cifar():
    path = SHARED / "cifar10-test"
    if not path.exists():
        pytest.skip(f"shared data missing: {path}")
    return path


@pytest.fixture
def sweep_args(resnet20, cifar, tmp_path):
    """`dsq sweep` arguments for a 2 x 2 grid on LIMIT images, writing tmp_path/sw.*."""
    return ["sweep", str(resnet20), "--data", str(cifar), "--bits", "2,4", "--block", "16,32",
            "--limit", str(LIMIT), "--batch-size", str(LIMIT), "-j", "0", "-q", "--per-pass", "2",
            "-o", str(tmp_path / "sw")]
