"""`dsq quantize` through click's CliRunner on the real CIFAR-10 ResNet-20 and test images."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dsq_cli_testkit import CIFAR, LIMIT, RESNET20, RESNET20_CONVS, accuracy_rows, need, run_dsq, table_rows

MIB = 2**20

pytestmark = pytest.mark.realdata


# ---- the shared run: quantize --data --limit 200 --json -o ------------------------------------


def test_prints_a_row_per_layer_with_linear_kept_float(resnet20_run):
    rows = table_rows(resnet20_run.stdout, "layer")
    assert list(rows) == RESNET20_CONVS + ["linear"]
    for name in RESNET20_CONVS:
        kind, shape, groups, bits = rows[name][:4]
        assert (kind, groups, bits) == ("conv", "1", "4"), (name, rows[name])
        assert "->" in rows[name][-1]  # size before -> after
    assert rows["linear"][:4] == ["linear", "10x64", "1", "float"]
    assert "kept float: linear" in resnet20_run.stdout


def test_prints_the_model_size_before_and_after(resnet20_run):
    q = resnet20_run.json["quantization"]
    before, after = q["model_float_bytes"] / MIB, q["model_quantized_bytes"] / MIB
    assert after < before / 4  # 4-bit weights with scales: several times smaller
    line = next(line for line in resnet20_run.stdout.splitlines() if line.startswith("model size:"))
    assert f"{before:.2f} MiB float -> {after:.2f} MiB packed" in line
    assert f"({q['compression']:.2f}x smaller)" in line
    assert f"quantized {len(RESNET20_CONVS)} layers" in resnet20_run.stdout


def test_prints_float_and_quantized_accuracy_on_the_same_images(resnet20_run):
    acc = accuracy_rows(resnet20_run.stdout)
    assert list(acc) == ["float", "quantized"]
    assert acc["float"].images == acc["quantized"].images == LIMIT
    # ResNet-20 reaches 81 % on these JPEGs; 4 bits with BFP8 inputs stays close
    assert 70 <= float(acc["float"].top1) <= 95
    assert float(acc["quantized"].top1) >= float(acc["float"].top1) - 10
    assert "data: 10000 images, 10 classes" in resnet20_run.result.stderr


def test_json_holds_layers_settings_accuracy_and_versions(resnet20_run):
    j = resnet20_run.json
    assert j["model"]["arch"] == "cifar_resnet20" and j["model"]["num_classes"] == 10
    q = j["quantization"]
    assert [layer["name"] for layer in q["layers"]] == RESNET20_CONVS + ["linear"]
    assert [layer["quantized"] for layer in q["layers"]] == [True] * 19 + [False]
    w = q["settings"]["weight"]
    assert w["bits"] == 4 and w["block"] == 32 and w["method"] == "l2"
    assert q["settings"]["act"]["bits"] == 8
    acc = j["accuracy"]
    for kind in ("float", "quantized"):
        assert set(acc[kind]) >= {"top1", "top5", "images"} and acc[kind]["images"] == LIMIT
    assert acc["drop"]["top1"] == pytest.approx(acc["float"]["top1"] - acc["quantized"]["top1"])
    assert acc["drop"]["top5"] == pytest.approx(acc["float"]["top5"] - acc["quantized"]["top5"])
    assert set(j["versions"]) >= {"dsq", "torch", "python"}
    import dsq

    assert j["versions"]["dsq"] == dsq.__version__


def test_json_numbers_equal_the_printed_ones(resnet20_run):
    j, out = resnet20_run.json, resnet20_run.stdout
    printed = accuracy_rows(out)
    for kind in ("float", "quantized"):
        a = j["accuracy"][kind]
        assert (printed[kind].top1, printed[kind].top5, printed[kind].images) == (
            f"{a['top1']:.2f}",
            f"{a['top5']:.2f}",
            a["images"],
        )
    assert f"{-j['accuracy']['drop']['top1']:+.2f}" in table_rows(out, "model")["quantized"]
    rows = table_rows(out, "layer")
    for layer in j["quantization"]["layers"]:
        cells = rows[layer["name"]]
        assert cells[1] == "x".join(map(str, layer["shape"]))
        assert f"{layer['bits_per_weight']:.2f}" in cells
        if layer["sqnr_db"] is not None:
            assert f"{layer['sqnr_db']:.1f}" in cells
    q = j["quantization"]
    assert f"at {q['mean_bits_per_weight']:.2f} bits per weight" in out


def test_writes_the_model_file_and_says_so(resnet20_run):
    assert resnet20_run.model_file.stat().st_size > 0
    size, checkpoint = resnet20_run.model_file.stat().st_size, Path(RESNET20).stat().st_size
    wrote = f"wrote {resnet20_run.model_file}"
    line = next(line for line in resnet20_run.stdout.splitlines() if line.startswith(wrote))
    # the real size of the file, and its ratio to the float checkpoint file
    assert (
        f": {size:,} bytes ({size / 1e6:.2f} MB), {checkpoint / size:.2f}x smaller than the float checkpoint "
        f"{Path(RESNET20).name} ({checkpoint:,} bytes)" in line
    )
    assert 4 < checkpoint / size < 8  # 4-bit weights with float32 scales, a float linear layer and BatchNorms
    assert f"wrote {resnet20_run.folder / 'run.json'}" in resnet20_run.stdout
    # nothing else (no temporary files) beside the outputs
    assert sorted(p.name for p in resnet20_run.folder.iterdir()) == ["model.dsq", "run.json"]


# ---- options -------------------------------------------------------------------------------


def _accuracy_at(bits: int, tmp_path) -> dict:
    result = run_dsq(
        "quantize",
        RESNET20,
        "--bits",
        bits,
        "--data",
        CIFAR,
        "--limit",
        100,
        "-j",
        0,
        "-q",
        "--json",
        tmp_path / f"bits{bits}.json",
    )
    assert result.exit_code == 0, result.output
    return json.loads((tmp_path / f"bits{bits}.json").read_text())["accuracy"]


def test_eight_bits_lose_less_than_two_bits(tmp_path):
    need(RESNET20), need(CIFAR)
    eight, two = _accuracy_at(8, tmp_path), _accuracy_at(2, tmp_path)
    same = ("top1", "top5", "images")
    assert [eight["float"][k] for k in same] == [two["float"][k] for k in same]  # the same images
    assert abs(eight["drop"]["top1"]) <= 5
    assert eight["drop"]["top1"] < two["drop"]["top1"]
    assert eight["quantized"]["top1"] > two["quantized"]["top1"]


def test_exclude_keeps_matching_layers_float(tmp_path):
    need(RESNET20)
    result = run_dsq("quantize", RESNET20, "--exclude", "layer3.*", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    rows = table_rows(result.stdout, "layer")
    layer3 = [n for n in RESNET20_CONVS if n.startswith("layer3.")]
    assert len(layer3) == 6
    for name in RESNET20_CONVS:
        assert rows[name][3] == ("float" if name in layer3 else "4"), (name, rows[name])
        if name in layer3:
            assert f"kept float: {name} (excluded by pattern 'layer3.*')" in result.stdout
    assert f"quantized {len(RESNET20_CONVS) - 6} layers" in result.stdout
    layers = {r["name"]: r for r in json.loads((tmp_path / "r.json").read_text())["quantization"]["layers"]}
    assert [n for n, r in layers.items() if not r["quantized"]] == layer3 + ["linear"]


def test_no_act_keeps_conv_inputs_float(tmp_path, resnet20_run):
    need(RESNET20)
    result = run_dsq("quantize", RESNET20, "--no-act", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    rows = table_rows(result.stdout, "layer")
    for name in RESNET20_CONVS:
        assert rows[name][3] == "4"
        assert not any(cell.startswith("bfp") for cell in rows[name]), rows[name]
    q = json.loads((tmp_path / "r.json").read_text())["quantization"]
    assert q["act_format"] is None and q["settings"]["act"] is None
    # and with act (the default) the inner convs do read BFP inputs
    default = table_rows(resnet20_run.stdout, "layer")
    assert any(cell.startswith("bfp8") for cell in default["layer1.0.conv1"])


def test_method_kl(tmp_path):
    need(RESNET20)
    result = run_dsq("quantize", RESNET20, "--method", "kl", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert list(table_rows(result.stdout, "layer")) == RESNET20_CONVS + ["linear"]
    q = json.loads((tmp_path / "r.json").read_text())["quantization"]
    assert q["settings"]["weight"]["method"] == "kl" and q["weight_format"]["method"] == "kl"
    assert all(r["sqnr_db"] > 5 for r in q["layers"] if r["quantized"])


def test_quiet_suppresses_the_layer_table_and_progress():
    need(RESNET20)
    result = run_dsq("quantize", RESNET20, "-q")
    assert result.exit_code == 0, result.output
    assert "SQNR" not in result.output and "layer1.0.conv1" not in result.output
    assert "quantizing" not in result.stderr  # no progress bar
    assert result.stdout.startswith("quantized 19 layers")
    assert "model size:" in result.stdout and "kept float: linear" in result.stdout


# ---- help ----------------------------------------------------------------------------------


def _help(*command) -> str:
    result = run_dsq(*command, "--help")
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())  # undo click's line wrapping


def test_quantize_help_states_defaults():
    text = _help("quantize")
    assert text.startswith("Usage: dsq quantize [OPTIONS] MODEL")
    for expected in (
        "--bits INTEGER RANGE",
        "[default: 4",
        "default: 32",
        "[default: l2]",
        "[default: 8",
        "--act / --no-act",
        "[default: act]",
        "[default: all]",
        "[default: cpu]",
        "[default: 64",
        "-o, --output",
        "--json",
        "--exclude",
        "--trust-pickle",
        "--preset",
    ):
        assert expected in text, expected


def test_adapt_weights_help_names_every_mode_and_the_default():
    assert re.search(r"--adapt-weights \[ste\|fixed\|learned\] [^[]*learned[^[]*\[default: fixed\]", _help("quantize"))


def test_act_search_help_says_it_is_off_by_default():
    assert re.search(r"--act-search / --no-act-search [^[]*\[default: no-act-search\]", _help("quantize"))


def test_eval_help_states_defaults():
    text = _help("eval")
    assert text.startswith("Usage: dsq eval [OPTIONS] MODEL")
    for expected in (
        "--data PATH",
        "[required]",
        "[default: all]",
        "[default: cpu]",
        "[default: 64",
        "[default: the model's]",
        "--json",
    ):
        assert expected in text, expected


def test_demo_help_states_defaults():
    text = _help("demo")
    assert text.startswith("Usage: dsq demo [OPTIONS]")
    assert "[default: 4" in text and "default: 32" in text and "--json" in text


@pytest.mark.parametrize("command", ["quantize", "eval"])
def test_backend_option_states_choices_default_and_what_each_is(command):
    text = _help(command)
    option = re.search(r"--backend \[simulate\|int\|exact\] ([^[]*)\[default: simulate\]", text)
    assert option, text
    for backend in ("simulate (", "int (", "exact ("):
        assert backend in option.group(1)


def test_group_help_lists_the_commands():
    text = _help()
    for command in ("quantize", "eval", "demo", "--version"):
        assert command in text


def test_trust_pickle_loads_a_whole_model_file(tmp_path):
    """A whole pickled module is refused without --trust-pickle (see test_cli_errors) and loads with it."""
    import torch

    from dsq.models import build_model

    torch.save(build_model("cifar_resnet20"), tmp_path / "resnet20-whole.pth")
    result = run_dsq("quantize", tmp_path / "resnet20-whole.pth", "--trust-pickle", "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("quantized 19 layers") and "kept float: linear" in result.stdout
