"""`dsq eval` through click's CliRunner: the dsq file that `dsq quantize -o` wrote, the float
CIFAR checkpoint, and a torchvision-style state_dict file."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

from dsq_cli_testkit import CIFAR, LIMIT, RESNET20, accuracy_rows, need, run_dsq

pytestmark = pytest.mark.realdata


def test_quantized_file_scores_exactly_what_quantize_reported(resnet20_run, tmp_path):
    result = run_dsq(
        "eval", resnet20_run.model_file, "--data", CIFAR, "--limit", LIMIT, "-j", 0, "--json", tmp_path / "eval.json"
    )
    assert result.exit_code == 0, result.output
    acc = accuracy_rows(result.stdout)
    assert list(acc) == ["quantized"]
    assert acc["quantized"] == accuracy_rows(resnet20_run.stdout)["quantized"]
    got = json.loads((tmp_path / "eval.json").read_text())
    want = resnet20_run.json["accuracy"]["quantized"]
    assert got["kind"] == "quantized" and got["model"] == str(resnet20_run.model_file)
    assert (got["accuracy"]["top1"], got["accuracy"]["top5"], got["accuracy"]["images"]) == (
        want["top1"],
        want["top5"],
        want["images"],
    )
    assert set(got["versions"]) >= {"dsq", "torch", "python"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def test_float_checkpoint_scores_what_quantize_reported_for_float(resnet20_run):
    result = run_dsq("eval", RESNET20, "--data", CIFAR, "--limit", LIMIT, "-j", 0, "-q")
    assert result.exit_code == 0, result.output
    acc = accuracy_rows(result.stdout)
    assert list(acc) == ["float"]
    assert acc["float"] == accuracy_rows(resnet20_run.stdout)["float"]
    assert "data: 10000 images, 10 classes" in result.stderr


def test_torchvision_state_dict_runs_with_a_preset(tmp_path):
    """An untrained torchvision ResNet-18 for 10 classes: chance accuracy, but it must run."""
    need(CIFAR)
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    result = run_dsq(
        "eval",
        weights,
        "--preset",
        "cifar10",
        "--data",
        CIFAR,
        "--limit",
        50,
        "-j",
        0,
        "-q",
        "--json",
        tmp_path / "eval.json",
    )
    assert result.exit_code == 0, result.output
    acc = accuracy_rows(result.stdout)
    assert list(acc) == ["float"] and acc["float"].images == 50
    assert 0 <= float(acc["float"].top1) <= 100
    got = json.loads((tmp_path / "eval.json").read_text())
    assert got["kind"] == "float" and got["accuracy"]["images"] == 50
