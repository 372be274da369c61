"""Shared helpers for the dsq.models tests."""

from pathlib import Path

import pytest


SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The real models and images, read in place (never copied into the repo)."""
    return SHARED_DATA
