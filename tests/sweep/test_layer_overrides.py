"""Per-layer precision: --keep-float and --layer-bits GLOB=BITS, shown for every layer and kept in a dsq file."""

import json

import pytest
import torch
from click.testing import CliRunner

import dsq
from dsq import artifact
from dsq.cli import cli
from dsq.config import LayerRule, QuantConfig
from dsq.models import load_model

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def float_resnet20(resnet20):
    return load_model(str(resnet20)).model


def test_first_matching_glob_wins(float_resnet20):
    _, report = dsq.quantize(
        float_resnet20, bits=4, block=16, layer_bits={"layer3.*": 8, "layer*": 2}, exclude=("layer3.2.conv2",)
    )
    bits = {r.name: r.bits for r in report.layers}
    assert bits["conv1"] == 4 and bits["layer1.0.conv1"] == 2 and bits["layer3.0.conv1"] == 8
    assert bits["layer3.2.conv2"] is None and bits["linear"] is None  # kept float
    notes = {r.name: r.note for r in report.layers}
    assert notes["layer3.0.conv1"] == "8 bits by pattern 'layer3.*'" and notes["conv1"] == ""
    assert [r for r in report.config.rules if r.bits in (8, 2) and r.name] == [
        LayerRule(name="layer3.*", bits=8),
        LayerRule(name="layer*", bits=2),
    ]
    by_name = {r.name: r for r in report.layers}
    assert by_name["layer3.0.conv1"].bits_per_weight > 8 > by_name["layer2.0.conv1"].bits_per_weight > 2


def test_cli_keep_float_and_layer_bits_reach_the_report_and_the_file(resnet20, tmp_path):
    args = [
        "quantize",
        str(resnet20),
        "--bits",
        "3",
        "--keep-float",
        "layer3.2.*",
        "--layer-bits",
        "conv1=8",
        "--layer-bits",
        "layer1.*=2",
        "--json",
        str(tmp_path / "r.json"),
        "-o",
        str(tmp_path / "m.dsq"),
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    layers = {r["name"]: r for r in json.loads((tmp_path / "r.json").read_text())["quantization"]["layers"]}
    assert layers["conv1"]["bits"] == 8 and layers["layer1.2.conv2"]["bits"] == 2
    assert layers["layer2.0.conv1"]["bits"] == 3 and not layers["layer3.2.conv1"]["quantized"]
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith(("conv1", "layer"))]
    table = {row[0]: row for row in rows}
    assert table["conv1"][4] == "8" and table["layer1.0.conv1"][4] == "2" and table["layer3.2.conv2"][4] == "float"
    model, recipe = artifact.load(tmp_path / "m.dsq")  # eval of the file keeps every layer's precision
    rules = QuantConfig.from_dict(recipe["settings"]).rules
    assert [r for r in rules if r.bits and r.name] == [
        LayerRule(name="conv1", bits=8),
        LayerRule(name="layer1.*", bits=2),
    ]
    assert model.conv1.weight_format.bits == 8 and model.layer1[0].conv1.weight_format.bits == 2
    assert isinstance(model.layer3[2].conv1, torch.nn.Conv2d) and not hasattr(model.layer3[2].conv1, "vqk")


@pytest.mark.parametrize("value", ["conv1", "conv1=9", "=4", "conv1=four"])
def test_bad_layer_bits_is_a_usage_error(resnet20, value):
    result = CliRunner().invoke(cli, ["quantize", str(resnet20), "--layer-bits", value])
    assert result.exit_code == 2 and "GLOB=BITS" in result.stderr and "Traceback" not in result.output
