"""`dsq sweep`: the float model once, every grid point, the same numbers in the table, CSV and JSON."""

import csv
import json

import pytest
import torch
from click.testing import CliRunner

import dsq
from dsq.cli import cli
from dsq.data import get_preset, open_dataset
from dsq.evaluate import evaluate
from dsq.models import load_model
from dsq.sweep import Sweep

from conftest import sweep_command

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def swept(tmp_path_factory, resnet20, cifar):
    folder = tmp_path_factory.mktemp("sweep")
    args = sweep_command(resnet20, cifar, folder / "sw", per_pass=3)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return result, folder


def test_writes_table_csv_json_and_plot(swept):
    result, folder = swept
    data = json.loads((folder / "sw.json").read_text())
    with open(folder / "sw.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(p["bits"], p["block"]) for p in data["points"]] == [(2, 16), (2, 32), (4, 16), (4, 32)]
    assert [(int(r["bits"]), int(r["block"]), float(r["top1"])) for r in rows] == [
        (p["bits"], p["block"], p["top1"]) for p in data["points"]
    ]
    lines = result.stdout.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("bits ")))
    table = [line.split() for line in lines[header + 2 : header + 7]]
    assert table[0][0] == "float" and float(table[0][4]) == data["results"]["float"]["top1"]
    for cells, point in zip(table[1:], data["points"]):
        assert [int(cells[0]), int(cells[1])] == [point["bits"], point["block"]]
        assert float(cells[4]) == pytest.approx(point["top1"], abs=0.005)
        assert float(cells[6]) == pytest.approx(point["top1"] - point["float_top1"], abs=0.005)
    assert (folder / "sw.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {folder / 'sw.json'}, {folder / 'sw.csv'}, {folder / 'sw.png'}" in result.stdout


def test_float_evaluated_once_with_all_points(swept):
    data = json.loads(swept[1].joinpath("sw.json").read_text())
    assert list(data["results"]) == ["float", "2b/16", "2b/32", "4b/16", "4b/32"]
    assert all(p["images"] == 100 and p["float_top1"] == data["results"]["float"]["top1"] for p in data["points"])
    assert data["settings"]["quantization"]["method"] == "l2" and data["grid"] == {"bits": [2, 4], "block": [16, 32]}
    bits_per_weight = {(p["bits"], p["block"]): p["bits_per_weight"] for p in data["points"]}
    assert bits_per_weight[(2, 32)] < bits_per_weight[(2, 16)] < bits_per_weight[(4, 32)] < bits_per_weight[(4, 16)]


def test_a_point_equals_quantize_and_evaluate(swept, resnet20, cifar):
    """A sweep point is exactly what `dsq.quantize` + `evaluate` give for those settings."""
    data = json.loads(swept[1].joinpath("sw.json").read_text())
    loaded = load_model(str(resnet20))
    dataset = open_dataset(cifar, get_preset("cifar10").transform())
    qmodel, report = dsq.quantize(loaded.model, bits=4, block=16)
    accuracy = evaluate({"q": qmodel}, dataset, limit=100, batch_size=100, progress=False)["q"]
    point = next(p for p in data["points"] if (p["bits"], p["block"]) == (4, 16))
    assert (point["top1"], point["top5"]) == (accuracy.top1, accuracy.top5)
    assert point["size_bytes"] == report.model_quantized_bytes


def test_library_sweep_without_files():
    """No output, no files: the library call evaluates in memory, passes grouped by per_pass."""
    images = torch.randn(8, 3, 8, 8)
    labels = torch.arange(8) % 4
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.Flatten(), torch.nn.LazyLinear(4))
    model(images)
    sweep = Sweep([3, 8], [8]).run(model, list(zip(images, labels.tolist())), per_pass=2, progress=False)
    assert [(p["bits"], p["block"]) for p in sweep.rows()] == [(3, 8), (8, 8)]
    assert sweep.results["float"]["images"] == 8 and sweep.pending == 0


@pytest.mark.parametrize(
    "option, value, words",
    [("--bits", "2,9", "2 to 8"), ("--block", "0,8", "from 1"), ("--bits", "four", "comma-separated")],
)
def test_bad_grid_is_a_usage_error(sweep_args, option, value, words):
    args = list(sweep_args)
    args[args.index(option) + 1] = value
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and words in result.stderr and "Traceback" not in result.output
