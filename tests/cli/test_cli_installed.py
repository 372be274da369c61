"""The installed `dsq` console script (next to this interpreter), run as a subprocess.

Each start imports torch and torchvision (several seconds here), so the three commands start
together once per module and the tests read their results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import dsq

from dsq_cli_testkit import CIFAR, RESNET20, accuracy_rows, need

DSQ = Path(sys.executable).parent / "dsq"
TIMEOUT_S = 300


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Start `dsq --version`, a small `dsq quantize` and a failing `dsq quantize` at once; their results."""
    if not DSQ.exists():
        pytest.skip(f"no installed dsq command at {DSQ}")
    tmp = tmp_path_factory.mktemp("installed")
    commands = {"version": ["--version"]}
    if RESNET20.exists() and CIFAR.exists():
        truncated = tmp / "resnet20-truncated.th"
        truncated.write_bytes(RESNET20.read_bytes()[:100_000])
        (tmp / "out").mkdir()
        (tmp / "err").mkdir()
        commands["quantize"] = [
            "quantize",
            RESNET20,
            "--data",
            CIFAR,
            "--limit",
            50,
            "-o",
            tmp / "out" / "model.dsq",
            "--json",
            tmp / "out" / "run.json",
        ]
        commands["error"] = ["quantize", truncated, "--data", CIFAR, "-o", tmp / "err" / "model.dsq"]
    started = {
        name: subprocess.Popen(
            [str(DSQ), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp
        )
        for name, args in commands.items()
    }
    done = {"tmp": tmp}
    for name, process in started.items():
        try:
            stdout, stderr = process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        done[name] = Done(process.returncode, stdout, stderr)
    return done


def _get(runs: dict, name: str) -> Done:
    if name not in runs:
        need(RESNET20), need(CIFAR)
    return runs[name]


def test_version(runs):
    v = runs["version"]
    assert v.returncode == 0, v.stderr
    assert v.stderr == ""
    assert v.stdout.strip() == f"dsq, version {dsq.__version__}"


@pytest.mark.realdata
def test_quantize_end_to_end(runs):
    q, out = _get(runs, "quantize"), runs["tmp"] / "out"
    assert q.returncode == 0, q.stderr
    assert "Traceback" not in q.stderr and "Warning" not in q.stderr, q.stderr
    assert q.stderr.startswith("data: 10000 images, 10 classes")
    assert "layer1.0.conv1" in q.stdout and "model size:" in q.stdout
    acc = accuracy_rows(q.stdout)
    assert list(acc) == ["float", "quantized"] and acc["quantized"].images == 50
    assert sorted(os.listdir(out)) == ["model.dsq", "run.json"]
    assert json.loads((out / "run.json").read_text())["accuracy"]["quantized"]["images"] == 50
    assert f"wrote {out / 'model.dsq'}" in q.stdout


@pytest.mark.realdata
def test_user_error_is_one_line_on_stderr(runs):
    e = _get(runs, "error")
    assert e.returncode != 0
    assert e.stdout == ""
    assert "Traceback" not in e.stderr
    lines = [line for line in e.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), e.stderr
    assert "resnet20-truncated.th" in lines[0] and "not a readable" in lines[0]
    assert not any((runs["tmp"] / "err").iterdir())
