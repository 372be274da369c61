"""An interrupted `dsq sweep` resumes: finished points are kept, never evaluated again."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

import dsq.sweep
from dsq.cli import cli

pytestmark = pytest.mark.realdata


def results(tmp_path) -> dict:
    return json.loads((tmp_path / "sw.json").read_text())["results"]


class Killed(Exception):
    """Stands for the process being stopped."""


def counting_quantize(monkeypatch, fail_at=None) -> list:
    """Count `quantize` calls of the sweep; raise Killed at call number `fail_at`."""
    calls, real = [], dsq.sweep.quantize

    def quantize(model, config):
        calls.append((config.weight.bits, config.weight.block))
        if len(calls) == fail_at:
            raise Killed
        return real(model, config)

    monkeypatch.setattr(dsq.sweep, "quantize", quantize)
    return calls


def test_interrupted_sweep_finishes_without_redoing_points(sweep_args, tmp_path, monkeypatch):
    # per pass 2: [float, 2b/16], [2b/32, 4b/16], [4b/32]; interrupted while building pass 2
    calls = counting_quantize(monkeypatch, fail_at=2)
    interrupted = CliRunner().invoke(cli, sweep_args)
    assert isinstance(interrupted.exception, Killed)
    before = results(tmp_path)
    assert list(before) == ["float", "2b/16"]

    calls = counting_quantize(monkeypatch)
    resumed = CliRunner().invoke(cli, sweep_args)
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.stderr and "2 models already evaluated" in resumed.stderr
    assert calls == [(2, 32), (4, 16), (4, 32)]  # neither the float model nor 2b/16 again
    after = results(tmp_path)
    assert set(after) == {"float", "2b/16", "2b/32", "4b/16", "4b/32"}
    assert {k: after[k] for k in before} == before  # kept as they were, timings included


def test_killed_sweep_resumes(sweep_args, tmp_path):
    """SIGKILL after the first saved pass: the JSON is whole, the rerun finishes the rest."""
    args = list(sweep_args)
    args[args.index("--per-pass") + 1] = "1"
    process = subprocess.Popen(
        [sys.executable, "-m", "dsq", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "sw.json").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    before = results(tmp_path)
    assert 1 <= len(before) < 5, list(before)
    resumed = CliRunner().invoke(cli, sweep_args)
    assert resumed.exit_code == 0, resumed.output
    after = results(tmp_path)
    assert len(after) == 5 and {k: after[k] for k in before} == before
    assert sorted(os.listdir(tmp_path)) == ["sw.csv", "sw.json", "sw.png"]  # no temporary files left


def test_other_settings_are_refused_unless_no_resume(sweep_args, tmp_path, monkeypatch):
    counting_quantize(monkeypatch, fail_at=2)
    CliRunner().invoke(cli, sweep_args)
    refused = CliRunner().invoke(cli, [*sweep_args, "--rounds", "0"])
    assert refused.exit_code == 1 and refused.stdout == ""
    error = [line for line in refused.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "quantization.rounds: 5 there, 0 now" in error[0] and "--no-resume" in error[0]
    calls = counting_quantize(monkeypatch)
    fresh = CliRunner().invoke(cli, [*sweep_args, "--rounds", "0", "--no-resume", "--bits", "4", "--block", "32"])
    assert fresh.exit_code == 0, fresh.output
    assert calls == [(4, 32)] and list(results(tmp_path)) == ["float", "4b/32"]


def test_a_wider_grid_reuses_finished_points(sweep_args, monkeypatch):
    args = list(sweep_args)
    args[args.index("--bits") + 1], args[args.index("--block") + 1] = "4", "32"
    assert CliRunner().invoke(cli, args).exit_code == 0
    calls = counting_quantize(monkeypatch)
    args[args.index("--bits") + 1] = "2,4"
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert calls == [(2, 32)]
