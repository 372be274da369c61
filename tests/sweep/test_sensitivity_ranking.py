"""`dsq sensitivity`: one layer quantized at a time and all but one, ranked, with advice to act on."""

import json
from dataclasses import replace

import pytest
from click.testing import CliRunner

import dsq.sensitivity
from dsq.cli import cli
from dsq.config import LayerRule, quant_config
from dsq.sensitivity import Sensitivity, exact_glob

pytestmark = pytest.mark.realdata
LAYERS = ["layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1"]


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, resnet20, cifar):
    """Three layers with 2-bit weights and inputs (the others float) on 100 images: each costs accuracy."""
    folder = tmp_path_factory.mktemp("sensitivity")
    args = [
        "sensitivity",
        str(resnet20),
        "--data",
        str(cifar),
        "--bits",
        "2",
        "--act-bits",
        "2",
        "--limit",
        "100",
        "--batch-size",
        "100",
        "-j",
        "0",
        "-q",
        "--per-pass",
        "8",
        "-o",
        str(folder / "s"),
        *[a for layer in LAYERS for a in ("--include", layer)],
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return result, json.loads((folder / "s.json").read_text()), folder


def test_every_layer_measured_both_ways(analysed):
    _, data, _ = analysed
    results = data["results"]
    assert set(results) == {"float", "all quantized", *(f"only {n}" for n in LAYERS), *(f"all but {n}" for n in LAYERS)}
    rows = data["layers"]
    assert sorted(r["layer"] for r in rows) == LAYERS and [r["rank"] for r in rows] == [1, 2, 3]
    assert [r["damage"] for r in rows] == sorted((r["damage"] for r in rows), reverse=True)
    for r in rows:
        assert r["bits"] == 2 and r["only_top1"] == results[f"only {r['layer']}"]["top1"]
        assert r["only_drop"] == pytest.approx(r["only_top1"] - results["float"]["top1"])
        assert r["all_but_gain"] == pytest.approx(r["all_but_top1"] - results["all quantized"]["top1"])
        assert r["damage"] == pytest.approx((r["all_but_gain"] - r["only_drop"]) / 2)


def test_prints_table_advice_and_writes_files(analysed):
    result, data, folder = analysed
    worst = [r["layer"] for r in data["layers"] if r["damage"] > 0][:3]
    assert worst, data["layers"]
    assert " ".join(f"--keep-float '{n}'" for n in worst) in result.stdout
    assert " ".join(f"--layer-bits '{n}=8'" for n in worst) in result.stdout
    first = next(line for line in result.stdout.splitlines() if line.startswith(data["layers"][0]["layer"]))
    assert first.split()[-1] == f"{data['layers'][0]['damage']:.2f}"
    assert (folder / "s.png").read_bytes()[:4] == b"\x89PNG" and (folder / "s.csv").read_text().startswith("rank,layer")


def test_models_are_built_as_described(monkeypatch):
    """'only L' quantizes exactly L; 'all but L' everything else (names with glob characters too)."""
    calls = []
    monkeypatch.setattr(dsq.sensitivity, "quantize", lambda model, config: calls.append(config) or (model, None))
    config = quant_config(bits=3, exclude=("fc",))
    run = Sensitivity(config)
    run._only(None, "features[1].conv")
    run._all_but(None, "features[1].conv")
    assert calls == [
        replace(config, include=("features[[]1].conv",)),
        replace(config, rules=(LayerRule(name="features[[]1].conv", keep_float=True), *config.rules)),
    ]
    assert exact_glob("a*b?c[d]") == "a[*]b[?]c[[]d]"
