"""Shared helpers for the dsq.models tests."""

from pathlib import Path

import pytest

from dsq.errors import DsqError

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The real models and images, read in place (never copied into the repo)."""
    return SHARED_DATA


@pytest.fixture
def user_error():
    """Run a call that must fail with a one-line DsqError; return its message."""

    def run(call, *args, **kwargs) -> str:
        with pytest.raises(DsqError) as caught:
            call(*args, **kwargs)
        message = str(caught.value)
        assert message and "\n" not in message, message
        return message

    return run
