"""`dsq quantize/eval timm/<model> --checkpoint FILE`: a state_dict saved here, never a download."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dsq import artifact

from dsq_cli_testkit import accuracy_rows, error_line, run_dsq

timm = pytest.importorskip("timm", reason="timm models need the optional extra: pip install 'dsq[timm]'")

MODEL = "lcnet_050"  # a small timm CNN: 1.9 M parameters


def save_weights(state_dict: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({key: tensor.contiguous() for key, tensor in state_dict.items()}, path)
    else:
        torch.save(state_dict, path)
    return path


@pytest.fixture(scope="module")
def two_classes() -> dict:
    """The state_dict of a random MODEL with 2 classes."""
    torch.manual_seed(0)
    return timm.create_model(MODEL, num_classes=2).state_dict()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """2 class folders of 2 small random images each."""
    folder = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(0)
    for label in ("cat", "dog"):
        (folder / label).mkdir()
        for i in range(2):
            pixels = torch.randint(0, 256, (60, 80, 3), generator=generator, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / label / f"{i}.png")
    return folder


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_quantize_from_a_checkpoint(suffix, two_classes, tmp_path):
    weights = save_weights(two_classes, tmp_path / f"weights{suffix}")
    result = run_dsq("quantize", f"timm/{MODEL}", "--checkpoint", weights, "-q", "-o", tmp_path / "q.dsq")
    assert result.exit_code == 0, result.output
    recipe = artifact.read_recipe(tmp_path / "q.dsq")
    assert (recipe["arch"], recipe["num_classes"]) == (f"timm/{MODEL}", 2)
    cfg = timm.models.get_pretrained_cfg(MODEL)  # 224 pixels, crop_pct 0.875, bilinear
    assert recipe["preset"]["name"] == f"timm/{MODEL}" and recipe["preset"]["crop"] == cfg.input_size[-1]
    assert recipe["preset"]["resize"] == int(cfg.input_size[-1] / cfg.crop_pct)
    assert recipe["preset"]["interpolation"] == cfg.interpolation


def test_quantize_evaluates_and_eval_reads_both_forms(two_classes, images, tmp_path):
    weights = save_weights(two_classes, tmp_path / "weights.safetensors")
    data = ["--data", images, "-j", 0, "-q"]
    result = run_dsq("quantize", f"timm/{MODEL}", "--checkpoint", weights, *data, "-o", tmp_path / "q.dsq")
    assert result.exit_code == 0, result.output
    assert accuracy_rows(result.stdout)["quantized"].images == 4
    quantized = run_dsq("eval", tmp_path / "q.dsq", *data, "--json", tmp_path / "eval.json")
    assert quantized.exit_code == 0, quantized.output
    assert json.loads((tmp_path / "eval.json").read_text())["accuracy"]["images"] == 4
    floated = run_dsq("eval", f"timm/{MODEL}", "--checkpoint", weights, *data, "--preset", "imagenet")
    assert floated.exit_code == 0, floated.output
    assert list(accuracy_rows(floated.stdout)) == ["float"]


def _vit(tmp: Path) -> list:
    return ["timm/vit_tiny_patch16_224", "--checkpoint", tmp / "any.pth"]


def _no_checkpoint(tmp: Path) -> list:
    return [f"timm/{MODEL}"]


def _missing_file(tmp: Path) -> list:
    return [f"timm/{MODEL}", "--checkpoint", tmp / "nowhere.safetensors"]


def _another_models_weights(tmp: Path) -> list:
    weights = save_weights(timm.create_model("resnet10t").state_dict(), tmp / "resnet10t.safetensors")
    return [f"timm/{MODEL}", "--checkpoint", weights]


def _misspelt_name(tmp: Path) -> list:
    return ["timm/lcnet_05", "--checkpoint", tmp / "any.pth"]


@pytest.mark.parametrize(
    "make_args, keywords",
    [
        (_vit, ["timm/vit_tiny_patch16_224", "attention-only", "convs"]),
        (_no_checkpoint, ["no built-in pretrained weights", "--checkpoint"]),
        (_missing_file, ["nowhere.safetensors", "does not exist"]),
        (_another_models_weights, ["do not fit architecture timm/lcnet_050", "missing keys"]),
        (_misspelt_name, ["did you mean", "timm/lcnet_050"]),
    ],
    ids=lambda v: getattr(v, "__name__", "")[1:] or None,
)
def test_user_errors_are_one_line(make_args, keywords, tmp_path):
    error_line(run_dsq("quantize", *make_args(tmp_path)), *keywords)
