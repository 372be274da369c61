"""`dsq bench`: the table and the JSON of a short run, a dsq file as MODEL, and bad input as one
line with nothing written. What each runtime computes and the peak memory are tested in
tests/test_bench.py; here --no-memory keeps the runs short."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from dsq_cli_testkit import RESNET20, error_line, folder_listing, need, run_dsq

pytestmark = pytest.mark.realdata

TORCH_RUNTIMES = ["float32", "simulate", "int", "int-fused", "torch-int8"]
SHORT = ["--batch-sizes", "2,1", "--repeats", 1, "--no-memory", "-q"]


def bench_rows(stdout: str) -> list[list[str]]:
    """The printed table's rows: runtime, batch, images/s, vs float32, peak MiB (and a note)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["runtime"]) + 2
    rows = []
    for line in lines[start:]:
        if not line.strip() or line.startswith("wrote "):
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def test_bench_prints_a_table_and_writes_json(tmp_path):
    runtimes = ",".join(TORCH_RUNTIMES)
    result = run_dsq("bench", need(RESNET20), "--bits", 3, *SHORT, "--runtimes", runtimes, "-o", tmp_path / "b.json")
    assert result.exit_code == 0, result.output
    rows = bench_rows(result.stdout)
    assert [row[:2] for row in rows] == [[name, batch] for batch in ("1", "2") for name in TORCH_RUNTIMES]
    for _, _, rate, ratio, peak, *note in rows:
        assert float(rate) > 0 and re.fullmatch(r"\d+\.\d\dx", ratio) and peak == "-" and note == []
    assert [row[3] for row in rows if row[0] == "float32"] == ["1.00x", "1.00x"]
    assert "load average" in result.stdout and "cpu: " in result.stdout and "peak MiB:" not in result.stdout
    assert result.stdout.rstrip().endswith(f"wrote {tmp_path / 'b.json'}")

    data = json.loads((tmp_path / "b.json").read_text())
    assert data["model"] == str(need(RESNET20))
    assert data["quantization"]["weight"]["bits"] == 3
    assert data["settings"] == {
        "side": 32,
        "batch_sizes": [1, 2],
        "repeats": 1,
        "warmup": 1,
        "threads": torch.get_num_threads(),
        "runtimes": TORCH_RUNTIMES,
        "memory": False,
    }
    assert data["machine"]["cpu"] and len(data["machine"]["load_average_after"]) == 3
    assert data["versions"]["torch"] == torch.__version__
    assert [[r["runtime"], str(r["batch"])] for r in data["rows"]] == [row[:2] for row in rows]
    for row in data["rows"]:
        assert len(row["seconds"]) == 1 and row["images_per_second"] > 0 and row["peak_bytes"] is None


def test_bench_of_a_dsq_file_takes_its_format(tmp_path):
    assert run_dsq("quantize", need(RESNET20), "--bits", 3, "-q", "-o", tmp_path / "r20.dsq").exit_code == 0
    options = ["--runtimes", "float32,int", "--input-size", 40, "--json", tmp_path / "b.json"]
    result = run_dsq("bench", tmp_path / "r20.dsq", *SHORT, *options)
    assert result.exit_code == 0, result.output
    assert [row[:2] for row in bench_rows(result.stdout)] == [[n, b] for b in ("1", "2") for n in ("float32", "int")]
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["quantization"]["weight"]["bits"] == 3 and data["settings"]["side"] == 40


# ---- bad input: one line, a non-zero exit, nothing written -------------------------------------


@pytest.fixture
def out(tmp_path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


@pytest.mark.parametrize(
    "option, value",
    [
        ("--batch-sizes", "0"),
        ("--batch-sizes", "1,,32"),
        ("--batch-sizes", "one"),
        ("--batch-sizes", "-1"),
        ("--runtimes", "float32,tensorrt"),
        ("--runtimes", ""),
        ("--repeats", "0"),
        ("--warmup", "0"),
        ("--threads", "0"),
        ("--input-size", "0"),
    ],
)
def test_bench_refuses_nonsense_option_values(option, value, out):
    result = run_dsq("bench", need(RESNET20), option, value, "-o", out / "b.json")
    error_line(result, option, value, usage=True)
    assert folder_listing(out) == []


def test_bench_of_a_missing_model(tmp_path, out):
    result = run_dsq("bench", tmp_path / "resnet20-missing.th", "-o", out / "b.json")
    error_line(result, "no such file", "resnet20-missing.th")
    assert folder_listing(out) == []


def test_bench_json_into_a_missing_folder(tmp_path):
    result = run_dsq("bench", need(RESNET20), "-o", tmp_path / "missing" / "b.json")
    error_line(result, "missing", "does not exist")


def test_bench_of_a_dsq_file_refuses_format_options(tmp_path, out):
    assert run_dsq("quantize", need(RESNET20), "-q", "-o", tmp_path / "r20.dsq").exit_code == 0
    result = run_dsq("bench", tmp_path / "r20.dsq", "--bits", 5, "-o", out / "b.json")
    error_line(result, "r20.dsq", "quantized dsq file", "--bits")
    assert folder_listing(out) == []
