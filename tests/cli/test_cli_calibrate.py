"""`dsq quantize --calib` and `dsq sweep --calib` on the real ResNet-20 and CIFAR-10 test images."""

from __future__ import annotations

import json

import pytest

from dsq_cli_testkit import CIFAR, RESNET20, RESNET20_CONVS, accuracy_rows, need, run_dsq, table_rows

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory):
    need(RESNET20), need(CIFAR)
    folder = tmp_path_factory.mktemp("calibrated")
    result = run_dsq(
        "quantize",
        RESNET20,
        "--bits",
        3,
        "--calib",
        CIFAR,
        "--calib-images",
        40,
        "--refit-images",
        24,
        "--adapt-steps",
        4,
        "--data",
        CIFAR,
        "--limit",
        100,
        "-j",
        0,
        "--json",
        folder / "run.json",
        "-o",
        folder / "m.dsq",
    )
    assert result.exit_code == 0, result.output
    return result, json.loads((folder / "run.json").read_text()), folder


def test_calibration_images_are_left_out_of_the_evaluation(calibrated_run):
    result, j, _ = calibrated_run
    assert "(40 calibration images left out)" in result.stderr
    assert "9960 images" in j["data"]
    assert accuracy_rows(result.stdout)["quantized"].images == 100


def test_the_table_and_json_show_output_sqnr_before_and_after(calibrated_run):
    result, j, _ = calibrated_run
    rows = table_rows(result.stdout, "layer")
    assert list(rows) == RESNET20_CONVS + ["linear"]
    cal = j["quantization"]["calibration"]
    assert cal["images"] == 40 and cal["fit_images"] == 24
    assert list(cal["stages"]) == ["plan", "sqnr_before", "refit", "adapt", "sqnr_after"]
    assert cal["adapt"]["steps"] == cal["plan"]["adapt_steps"] == 4 and cal["plan"]["budget"] is None
    layers = [layer for layer in j["quantization"]["layers"] if layer["quantized"]]
    assert all(isinstance(layer["out_sqnr_before_db"], float) for layer in layers)
    assert sum(layer["out_sqnr_after_db"] for layer in layers) > sum(layer["out_sqnr_before_db"] for layer in layers)
    assert "calibrated on 40 images" in result.stdout


def test_the_calibrated_file_evaluates_again(calibrated_run):
    _, j, folder = calibrated_run
    again = run_dsq("eval", folder / "m.dsq", "--data", CIFAR, "--limit", 100, "-j", 0)
    assert again.exit_code == 0, again.output
    # not the same images (eval does not know the calibration set), but the same model: close
    assert abs(float(accuracy_rows(again.stdout)["quantized"].top1) - j["accuracy"]["quantized"]["top1"]) <= 10


def test_an_empty_calibration_folder_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_dsq("quantize", need(RESNET20), "--calib", tmp_path / "empty")
    assert result.exit_code != 0
    assert result.stderr.strip().count("\n") == 0 and "no images" in result.stderr


def test_sweep_calibrates_every_point(tmp_path):
    need(RESNET20), need(CIFAR)
    result = run_dsq(
        "sweep",
        RESNET20,
        "--bits",
        "2",
        "--block",
        "32",
        "--calib",
        CIFAR,
        "--calib-images",
        30,
        "--adapt-steps",
        0,
        "--data",
        CIFAR,
        "--limit",
        60,
        "-j",
        0,
        "-q",
        "-o",
        tmp_path / "s",
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["settings"]["calibration"]["images"] == 30
    assert saved["settings"]["calibration"]["refit"] is True
