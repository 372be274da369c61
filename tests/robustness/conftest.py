"""Fixtures of the robustness tests: hostile inputs, data loss, stale results, memory, the API.

The CLI helpers (`run_dsq`, `error_line`, the shared-data paths) come from tests/cli's
testkit; `installed_dsq` runs the real console script in a subprocess, for what only a real
process shows (signals, kill -9, address-space limits, full disks).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CLI_TESTS = Path(__file__).resolve().parents[1] / "cli"
if str(CLI_TESTS) not in sys.path:
    sys.path.insert(0, str(CLI_TESTS))

DSQ = Path(sys.executable).parent / "dsq"


@pytest.fixture
def installed_dsq():
    """Run the installed `dsq` with arguments; returns the CompletedProcess (text, both streams)."""
    if not DSQ.exists():
        pytest.skip(f"no installed dsq command at {DSQ}")

    def run(*args, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([str(DSQ), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, **kwargs)

    return run
