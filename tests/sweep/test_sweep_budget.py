"""`dsq sweep --target-bits`: bit-budget points beside the uniform ones, in the table, CSV and JSON, resumable."""

from __future__ import annotations

import csv
import json

import pytest

from dsq_cli_testkit import CIFAR, RESNET20, need, run_dsq, table_rows

pytestmark = pytest.mark.realdata


def test_budget_points_beside_uniform_ones_and_resumed(tmp_path):
    need(RESNET20), need(CIFAR)
    args = ["sweep", RESNET20, "--data", CIFAR, "--limit", "100", "--bits", "3", "--block", "32"]
    args += ["--target-bits", "3,3.5", "--calib", CIFAR, "--calib-images", "32", "--no-refit", "--adapt-steps", "0"]
    args += ["-q", "-o", tmp_path / "sw"]
    first = run_dsq(*args)
    assert first.exit_code == 0, first.output
    rows = table_rows(first.stdout, "bits")
    assert list(rows) == ["float", "3", "<=3", "<=3.5"]
    data = json.loads((tmp_path / "sw.json").read_text())
    assert list(data["results"]) == ["float", "3b/32", "t3/32", "t3.5/32"]
    assert data["grid"]["target_bits"] == [3.0, 3.5]
    budget = {p["target_bits"]: p for p in data["points"] if p["target_bits"] is not None}
    assert budget[3.0]["bits_per_weight"] <= 3.0 and budget[3.5]["bits_per_weight"] <= 3.5
    policy = data["results"]["t3/32"]["layer_bits"]  # every conv: bits, or bits in flat blocks of 8 x 32
    assert len(policy) == 19 and all(
        v in range(2, 9)
        if isinstance(v, int)
        else v["bits"] in range(2, 9) and (v["block"], v["layout"]) == (256, "flat")
        for v in policy.values()
    )
    with open(tmp_path / "sw.csv", newline="") as file:
        assert [row["target_bits"] for row in csv.DictReader(file)] == ["", "3.0", "3.5"]
    again = run_dsq(*args)
    assert again.exit_code == 0, again.output
    assert "4 models already evaluated" in again.stderr
    assert json.loads((tmp_path / "sw.json").read_text())["results"] == data["results"]
