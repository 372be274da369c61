"""Shared test setup: `tests/` on sys.path (for `zoo`), and a one-line DsqError helper."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


@pytest.fixture
def one_line_dsq_error():
    """Run a call that must fail with a DsqError whose message is one non-empty line; return it."""
    from dsq.errors import DsqError

    def run(call, *args, **kwargs) -> str:
        with pytest.raises(DsqError) as caught:
            call(*args, **kwargs)
        message = str(caught.value)
        assert message.strip() and "\n" not in message, repr(message)
        return message

    return run
