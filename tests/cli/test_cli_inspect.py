"""`dsq inspect` and the -o file round trip through the CLI on the real CIFAR-10 ResNet-20:
the shared 4-bit run (default scale dtype) and a 3-bit run with the other scale dtype."""

from __future__ import annotations

import json
import re

import pytest
from safetensors import safe_open

from dsq.formats import DEFAULT_SCALE_DTYPE

from dsq_cli_testkit import (
    CIFAR,
    RESNET20,
    RESNET20_CONVS,
    accuracy_rows,
    error_line,
    folder_listing,
    need,
    run_dsq,
    table_rows,
)

pytestmark = pytest.mark.realdata

LIMIT_3BIT = 100
OTHER_SCALE_DTYPE = "float16" if DEFAULT_SCALE_DTYPE == "float32" else "float32"
BITS_OF = {"float16": 16, "float32": 32}
RUNS = [("resnet20_run", 4, BITS_OF[DEFAULT_SCALE_DTYPE]), ("other_run", 3, BITS_OF[OTHER_SCALE_DTYPE])]


@pytest.fixture(scope="module")
def other_run(tmp_path_factory):
    """`dsq quantize resnet20 --bits 3 --scale-dtype OTHER --data ... --limit 100 -o model.dsq`."""
    need(RESNET20), need(CIFAR)
    path = tmp_path_factory.mktemp("r20_3bit") / "model.dsq"
    result = run_dsq(
        "quantize",
        RESNET20,
        "--bits",
        3,
        "--scale-dtype",
        OTHER_SCALE_DTYPE,
        "--data",
        CIFAR,
        "--limit",
        LIMIT_3BIT,
        "-j",
        0,
        "-q",
        "-o",
        path,
    )
    assert result.exit_code == 0, result.output
    return result, path


def _inspect(path, *args):
    result = run_dsq("inspect", path, *args)
    assert result.exit_code == 0, result.output
    return result.stdout


def _file_bytes(path) -> dict[str, int]:
    """Bytes of each layer's packed VQK plus KDS, read with safetensors itself."""
    with safe_open(str(path), framework="pt") as f:
        nbytes = {k: (t := f.get_tensor(k)).numel() * t.element_size() for k in f.keys()}
    return {name: nbytes[f"{name}.vqk.packed"] + nbytes[f"{name}.kds"] for name in RESNET20_CONVS}


def _summary_value(stdout: str, prefix: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith(prefix))


def test_eval_of_a_3_bit_file_scores_what_quantize_reported(other_run):
    result, path = other_run
    evaluated = run_dsq("eval", path, "--data", CIFAR, "--limit", LIMIT_3BIT, "-j", 0, "-q")
    assert evaluated.exit_code == 0, evaluated.output
    assert accuracy_rows(evaluated.stdout)["quantized"] == accuracy_rows(result.stdout)["quantized"]


@pytest.mark.parametrize("run, bits, scale_bits", RUNS)
def test_inspect_prints_the_recipe(request, run, bits, scale_bits):
    fixture = request.getfixturevalue(run)
    stdout_q, path = (fixture.stdout, fixture.model_file) if run == "resnet20_run" else (fixture[0].stdout, fixture[1])
    out = _inspect(path)
    assert "model: cifar_resnet20, 10 classes, preprocessing cifar10" in out
    assert (
        f"weights: {bits}-bit VQK, block 32, layout auto, method l2 with 5 refinement rounds, float{scale_bits} KDS"
    ) in out
    assert "activations: 8-bit BFP mantissas in blocks of 32 channels, image input float" in out
    assert "kept float: linear" in out
    acc = accuracy_rows(stdout_q)
    assert f"accuracy: float {acc['float'].top1} %, quantized {acc['quantized'].top1} % top-1" in out


@pytest.mark.parametrize("run, bits, scale_bits", RUNS)
def test_inspect_table_gives_bits_per_weight_and_bytes_per_layer(request, run, bits, scale_bits):
    fixture = request.getfixturevalue(run)
    path = fixture.model_file if run == "resnet20_run" else fixture[1]
    rows = table_rows(_inspect(path), "layer")
    assert list(rows) == RESNET20_CONVS
    file_bytes = _file_bytes(path)
    for name, cells in rows.items():
        shape, layout, act, b, scales, bpw, float32, in_file, minimum, smaller = cells
        o, i, kh, kw = map(int, shape.split("x"))
        n, n_scales = o * i * kh * kw, o * -(-i // 32) * kh * kw
        assert (layout, b, scales) == ("channel", str(bits), f"{n_scales:,} x {scale_bits}b")
        assert act == ("float" if name == "conv1" else "bfp8/32")
        assert int(in_file.replace(",", "")) == file_bytes[name] == -(-n * bits // 8) + n_scales * scale_bits // 8
        assert int(float32.replace(",", "")) == 4 * n
        assert float(bpw) == pytest.approx(8 * file_bytes[name] / n, abs=5e-4)
        assert float(minimum.replace(",", "")) == pytest.approx((n * bits + n_scales * scale_bits) / 8, abs=0.5)
    assert rows["layer3.0.conv2"][5] == f"{bits + scale_bits / 32:.3f}"  # b + s / L with full blocks


def test_inspect_summary_gives_file_size_ratio_and_distance_to_the_minimum(resnet20_run, tmp_path):
    path = resnet20_run.model_file
    out = _inspect(path, "--json", tmp_path / "inspect.json")
    size = path.stat().st_size
    line = _summary_value(out, "file: ")
    assert f"({size:,} B)" in line
    float_bytes = resnet20_run.json["quantization"]["model_float_bytes"]
    assert f"{float_bytes / size:.2f}x smaller than the float model" in line
    above = float(re.search(r"the file is ([\d.]+) % above it", _summary_value(out, "theoretical minimum")).group(1))
    j = json.loads((tmp_path / "inspect.json").read_text())
    sizes = j["sizes"]
    assert sizes["file_bytes"] == size and sizes["ratio"] == pytest.approx(float_bytes / size)
    assert above == pytest.approx(100 * sizes["above_min"], abs=0.006)
    assert sizes["file_bytes"] == sizes["quantized_bytes"] + sizes["float_bytes"] + sizes["header_bytes"]
    assert sizes["min_bytes"] <= size
    assert j["recipe"]["settings"]["weight"]["scale_dtype"] == DEFAULT_SCALE_DTYPE
    assert f"wrote {tmp_path / 'inspect.json'}" in out


def test_scale_dtype_option_is_documented():
    text = " ".join(run_dsq("quantize", "--help").stdout.split())
    assert re.search(rf"--scale-dtype \[float16\|float32\] [^[]*\[default: {DEFAULT_SCALE_DTYPE}\]", text), text


# ---- user errors ---------------------------------------------------------------------------------


def test_inspect_of_a_missing_file(tmp_path):
    error_line(run_dsq("inspect", tmp_path / "missing.dsq"), "missing.dsq", "does not exist")


def test_inspect_of_a_float_checkpoint():
    error_line(run_dsq("inspect", need(RESNET20)), "resnet20", "not a dsq model file")


def test_inspect_of_a_truncated_file(resnet20_run, tmp_path):
    data = resnet20_run.model_file.read_bytes()
    (tmp_path / "model.dsq").write_bytes(data[: len(data) // 2])
    error_line(run_dsq("inspect", tmp_path / "model.dsq", "--json", tmp_path / "out.json"), "model.dsq", "truncated")
    assert folder_listing(tmp_path) == ["model.dsq"]
