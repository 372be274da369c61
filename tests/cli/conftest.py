"""Fixtures of the `dsq` command-line tests.

The heaviest call, `dsq quantize` of ResNet-20 with --data/--json/-o, runs once per session
(`resnet20_run`); several tests read its output, its JSON and its model file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import Result

from dsq_cli_testkit import CIFAR, LIMIT, RESNET20, need, run_dsq

# ---- the shared quantize run ----------------------------------------------------------------


@dataclass
class QuantizeRun:
    result: Result
    json: dict
    model_file: Path
    folder: Path

    @property
    def stdout(self) -> str:
        return self.result.stdout


@pytest.fixture(scope="session")
def resnet20_run(tmp_path_factory) -> QuantizeRun:
    """`dsq quantize resnet20-....th --data cifar10-test --limit 200 --json run.json -o model.dsq`."""
    need(RESNET20), need(CIFAR)
    folder = tmp_path_factory.mktemp("resnet20_run")
    result = run_dsq("quantize", RESNET20, "--data", CIFAR, "--limit", LIMIT, "-j", 0,
                     "--json", folder / "run.json", "-o", folder / "model.dsq")
    assert result.exit_code == 0, result.output
    return QuantizeRun(result, json.loads((folder / "run.json").read_text()), folder / "model.dsq", folder)
