"""`dsq export` and `dsq eval model.onnx` through click's CliRunner, on the dsq file that
`dsq quantize -o` wrote for ResNet-20."""

from __future__ import annotations

import onnx
import pytest
import torch

from dsq.models import build_model, load_model

from dsq_cli_testkit import CIFAR, LIMIT, RESNET20, accuracy_rows, error_line, folder_listing, run_dsq

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def exported(resnet20_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("exported")
    result = run_dsq("export", resnet20_run.model_file, "-o", folder / "model.onnx")
    assert result.exit_code == 0, result.output
    return folder / "model.onnx", result


def test_export_writes_a_checked_onnx_file_about_the_size_of_the_dsq_file(resnet20_run, exported):
    path, result = exported
    assert f"wrote {path}" in result.stdout
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert path.stat().st_size <= 1.05 * resnet20_run.model_file.stat().st_size
    meta = {p.key: p.value for p in model.metadata_props}
    assert {"dsq.arch", "dsq.num_classes", "dsq.preset"} <= set(meta)


def test_eval_runs_the_onnx_file_with_its_own_preset(resnet20_run, exported):
    """onnxruntime on the same images gives dsq's top-1 within one image of 200."""
    path, _ = exported
    result = run_dsq("eval", path, "--data", CIFAR, "--limit", LIMIT, "-j", 0, "-q")
    assert result.exit_code == 0, result.output
    onnx_top1 = float(accuracy_rows(result.stdout)["onnx"].top1)
    dsq_top1 = float(accuracy_rows(resnet20_run.stdout)["quantized"].top1)
    assert abs(onnx_top1 - dsq_top1) <= 100 / LIMIT


def test_weights_only_export_has_no_bfp_calls(resnet20_run, tmp_path):
    result = run_dsq("export", resnet20_run.model_file, "-o", tmp_path / "w.onnx", "--weights-only")
    assert result.exit_code == 0, result.output
    model = onnx.load(tmp_path / "w.onnx")
    assert not [n for n in model.graph.node if n.domain == "dsq"]


def test_pth_export_loads_into_the_float_architecture_without_dsq(resnet20_run, tmp_path):
    result = run_dsq("export", resnet20_run.model_file, "-o", tmp_path / "r20.pth")
    assert result.exit_code == 0, result.output
    state = torch.load(tmp_path / "r20.pth", weights_only=True)
    model = build_model("cifar_resnet20")
    model.load_state_dict(state)  # strict: exactly the float model's keys
    float_weight = load_model(str(RESNET20)).model.state_dict()["layer1.0.conv1.weight"]
    assert not torch.equal(state["layer1.0.conv1.weight"], float_weight)  # the dequantized one
    result = run_dsq("eval", tmp_path / "r20.pth", "--arch", "cifar_resnet20", "--data", CIFAR, "--limit", 50, "-q")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "args,words",
    [
        (["-o", "{tmp}/x.tflite"], [".onnx or .pth"]),
        (["-o", "{tmp}/x.onnx", "--format", "tflite"], ["tflite"]),
    ],
)
def test_export_errors_are_one_line_and_leave_nothing(resnet20_run, tmp_path, args, words):
    args = [a.format(tmp=tmp_path) for a in args]
    result = run_dsq("export", resnet20_run.model_file, *args)
    error_line(result, *words, usage="--format" in args)
    assert folder_listing(tmp_path) == []


def test_export_refuses_a_float_checkpoint(tmp_path):
    result = run_dsq("export", RESNET20, "-o", tmp_path / "x.onnx")
    error_line(result, "not a dsq file")
    assert folder_listing(tmp_path) == []


def test_eval_refuses_a_backend_for_an_onnx_file(exported):
    path, _ = exported
    error_line(run_dsq("eval", path, "--data", CIFAR, "--limit", 10, "--backend", "int"), "onnxruntime")


def test_eval_of_an_onnx_file_without_dsq_metadata_needs_a_preset(tmp_path):
    """An ONNX file that dsq.export wrote without metadata: --preset says how to prepare images."""
    import dsq

    qmodel, _ = dsq.quantize(load_model(str(RESNET20)).model, progress=False)
    path = tmp_path / "bare.onnx"
    dsq.export(qmodel, path, torch.zeros(2, 3, 32, 32))
    error_line(run_dsq("eval", path, "--data", CIFAR, "--limit", 10, "-j", 0), "--preset")
    result = run_dsq("eval", path, "--data", CIFAR, "--limit", 20, "-j", 0, "-q", "--preset", "cifar10")
    assert result.exit_code == 0, result.output
    assert accuracy_rows(result.stdout)["onnx"].images == 20
