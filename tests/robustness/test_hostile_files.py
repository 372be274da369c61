"""Hostile model files: .dsq files whose recipe or tensors lie (with a checksum that matches, so
the checks, not the checksum, must catch them), and float checkpoints with bad values.

Every case must end in one DsqError line, from `dsq.load` and from `dsq inspect`'s readers alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import dsq
from dsq import artifact
from dsq.models import build_model, load_model

from dsq_cli_testkit import CIFAR, error_line, run_dsq


class TwoConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 10, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x)))).mean((2, 3))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny skeleton-only .dsq and a ResNet-20 .dsq rebuilt by name (both written by this dsq)."""
    folder = tmp_path_factory.mktemp("good")
    torch.manual_seed(0)
    tiny = TwoConv().eval()
    dsq.save(folder / "tiny.dsq", *dsq.quantize(tiny, bits=4, block=4, rounds=0))
    r20 = build_model("cifar_resnet20")
    dsq.save(folder / "r20.dsq", *dsq.quantize(r20, rounds=0), arch="cifar_resnet20", num_classes=10)
    return folder, tiny


def _copy(saved, tmp_path, name="r20.dsq"):
    return shutil.copy(saved[0] / name, tmp_path / name)


def _sha256(recipe: dict, tensors: dict) -> str:
    """The checksum as docs/file-format.md defines it, for the recipe's format version."""
    h = hashlib.sha256()
    if recipe["format_version"] >= 2:
        text = json.dumps({k: v for k, v in recipe.items() if k != "sha256"}, sort_keys=True, separators=(",", ":"))
        h.update(f"{len(text)}|{text}".encode())
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def rewrite(path, change_recipe=None, change_tensors=None, checksum=True):
    """Write the .dsq at `path` again with its recipe and/or tensors changed, its checksum matching."""
    header_size = int.from_bytes(open(path, "rb").read(8), "little")
    recipe = json.loads(json.loads(open(path, "rb").read(8 + header_size)[8:])["__metadata__"]["dsq"])
    tensors = load_file(str(path))
    if change_recipe:
        change_recipe(recipe)
    if change_tensors:
        change_tensors(tensors)
    if checksum:
        recipe["sha256"] = _sha256(recipe, tensors)
    save_file(tensors, str(path), metadata={"dsq": json.dumps(recipe)})
    return path


# ---- 1. the recipe is covered by the checksum --------------------------------------------------


def test_a_changed_recipe_breaks_the_checksum(saved, tmp_path, one_line_dsq_error):
    path = rewrite(
        _copy(saved, tmp_path),
        lambda r: r.update(accuracy={"float": {"top1": 10.0, "images": 9}, "quantized": {"top1": 99.0, "images": 9}}),
        checksum=False,
    )
    for read in (dsq.load, artifact.read_recipe):
        message = one_line_dsq_error(read, path)
        assert "damaged" in message and "recipe" in message and "checksum" in message
    error_line(run_dsq("inspect", path), "damaged", "checksum")


def test_format_version_1_files_still_load_after_validation(saved, tmp_path):
    """A file written before the recipe was checksummed (tensors only) loads bit-identically."""
    path = rewrite(_copy(saved, tmp_path), lambda r: r.update(format_version=1))
    model, recipe = dsq.load(path)
    reference, _ = dsq.load(saved[0] / "r20.dsq")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    bad = rewrite(path, lambda r: r.update(num_classes="ten"))
    assert recipe["format_version"] == 1 and "damaged" in str(pytest.raises(dsq.DsqError, dsq.load, bad).value)


def test_current_files_are_format_version_2(saved):
    assert artifact.read_recipe(saved[0] / "r20.dsq")["format_version"] == 2


# ---- 2. every number of the recipe, checked before anything is allocated from it --------------


def _layer(name):
    return lambda r: r["layers"][name]


RECIPES = {
    "num_classes 300 million": lambda r: r.update(num_classes=300_000_000),
    "num_classes negative": lambda r: r.update(num_classes=-3),
    "num_classes string": lambda r: r.update(num_classes="10"),
    "num_classes bool": lambda r: r.update(num_classes=True),
    "num_classes float": lambda r: r.update(num_classes=10.0),
    "arch integer": lambda r: r.update(arch=20),
    "arch list": lambda r: r.update(arch=["cifar_resnet20"]),
    "preset string": lambda r: r.update(preset="cifar10"),
    "preset nameless": lambda r: r.update(preset={"resize": 32}),
    "preset bad std": lambda r: r.update(
        preset={"name": "cifar10", "resize": None, "crop": None, "mean": [0, 0, 0], "std": [0, 1, 1]}
    ),
    "layers list": lambda r: r.update(layers=list(r["layers"].values())),
    "layers missing": lambda r: r.pop("layers"),
    "layer shape 2^40": lambda r: _layer("conv1")(r).update(shape=[2**40, 3, 3, 3]),
    "layer shape zero": lambda r: _layer("conv1")(r).update(shape=[0, 3, 3, 3]),
    "layer shape 3-d": lambda r: _layer("conv1")(r).update(shape=[16, 3, 9]),
    "layer shape strings": lambda r: _layer("conv1")(r).update(shape=["16", 3, 3, 3]),
    "layer block 2^23": lambda r: _layer("layer3.0.conv2")(r)["weight_format"].update(block=2**23),
    "layer block 0": lambda r: _layer("layer1.0.conv1")(r)["weight_format"].update(block=0),
    "layer bits string": lambda r: _layer("conv1")(r)["weight_format"].update(bits="4"),
    "layer bits 9": lambda r: _layer("conv1")(r)["weight_format"].update(bits=9),
    "layer bits 2": lambda r: _layer("conv1")(r)["weight_format"].update(bits=2),
    "layer unknown format field": lambda r: _layer("conv1")(r)["weight_format"].update(colour="red"),
    "layer layout unknown": lambda r: _layer("conv1")(r).update(layout="diagonal"),
    "layer layout flat": lambda r: _layer("layer1.0.conv1")(r).update(layout="flat"),
    "act format bits 1": lambda r: _layer("layer1.0.conv1")(r).update(act_format={"bits": 1, "block": 32}),
    "act format list": lambda r: _layer("layer1.0.conv1")(r).update(act_format=[8, 32]),
    "settings bits string": lambda r: r["settings"].update(bits="four"),
    "settings missing": lambda r: r.pop("settings"),
    "settings scale dtype": lambda r: r["settings"].update(scale_dtype="float64"),
    "settings include string": lambda r: r["settings"].update(include="*"),
    "report layers dict": lambda r: r["report"].update(layers={}),
    "report quantized mismatch": lambda r: r["report"]["layers"][0].update(quantized=False),
    "accuracy NaN": lambda r: r.update(
        accuracy={"float": {"top1": float("nan"), "images": 5}, "quantized": {"top1": 9.0, "images": 5}}
    ),
    "accuracy string": lambda r: r.update(accuracy="99%"),
    "accuracy without top-1": lambda r: r.update(accuracy={"float": {"images": 5}, "quantized": {"images": 5}}),
    "format other": lambda r: r.update(format="onnx"),
    "dsq_version number": lambda r: r.update(dsq_version=1),
    "deep nesting": lambda r: r.update(preset={"name": "cifar10", "x": json.loads("[" * 50 + "]" * 50)}),
}


@pytest.mark.parametrize("case", list(RECIPES))
def test_a_recipe_that_lies_is_damaged(saved, tmp_path, case, one_line_dsq_error):
    path = rewrite(_copy(saved, tmp_path), RECIPES[case])
    for read in (artifact.read_recipe, artifact.file_sizes):  # what `dsq inspect` reads
        assert "damaged" in one_line_dsq_error(read, path)


@pytest.mark.parametrize(
    "case",
    [
        "num_classes 300 million",
        "arch integer",
        "num_classes string",
        "layers list",
        "layer shape 2^40",
        "layer bits string",
        "layer block 2^23",
    ],
)
def test_inspect_and_eval_say_damaged(saved, tmp_path, case):
    path = rewrite(_copy(saved, tmp_path), RECIPES[case])
    error_line(run_dsq("inspect", path), "damaged")
    error_line(run_dsq("eval", path, "--data", CIFAR, "--limit", 8), "damaged")


def test_a_null_preset_is_legal(saved, tmp_path):
    """dsq.save without a preset writes null: the file loads and inspects."""
    assert artifact.read_recipe(saved[0] / "r20.dsq")["preset"] is None
    dsq.load(saved[0] / "r20.dsq")
    assert run_dsq("inspect", saved[0] / "r20.dsq").exit_code == 0


def test_a_block_wider_than_the_axis_is_the_whole_axis(saved, tmp_path):
    """Block 2^23 where the stored scales fit it (each block of layer1 is its whole 16-channel axis)."""

    def widen(recipe):
        recipe["layers"]["layer1.0.conv1"]["weight_format"]["block"] = 2**23

    model, _ = dsq.load(rewrite(_copy(saved, tmp_path), widen))
    reference, _ = dsq.load(saved[0] / "r20.dsq")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_an_architecture_larger_than_the_file_is_refused_unbuilt(saved, tmp_path, one_line_dsq_error):
    path = rewrite(_copy(saved, tmp_path), lambda r: r.update(arch="vgg19"))
    assert "parameters" in one_line_dsq_error(dsq.load, path)


# ---- 3. bad tensors ---------------------------------------------------------------------------


def _set(key, value):
    return lambda tensors: tensors.__setitem__(key, value(tensors[key]))


def _poke(key, number):
    def change(tensors):
        t = tensors[key].clone()
        t.view(-1)[0] = number
        tensors[key] = t

    return change


TENSORS = {
    "NaN scale": _poke("conv.kds", float("nan")),
    "Inf scale": _poke("head.kds", float("inf")),
    "int32 scales": _set("conv.kds", lambda t: t.to(torch.int32)),
    "float64 scales": _set("conv.kds", lambda t: t.double()),
    "int8 packed codes": _set("conv.vqk.packed", lambda t: t.to(torch.int8)),
    "packed codes short": _set("conv.vqk.packed", lambda t: t[:-1].clone()),
    "scales reshaped": _set("conv.kds", lambda t: t.reshape(-1).clone()),
    "NaN BatchNorm mean": _poke("bn.running_mean", float("nan")),
    "Inf bias": _poke("head.bias", float("-inf")),
    "missing scales": lambda tensors: tensors.pop("head.kds"),
}


@pytest.mark.parametrize("case", list(TENSORS))
def test_bad_tensors_are_damaged(saved, tmp_path, case, one_line_dsq_error):
    path = rewrite(_copy(saved, tmp_path, "tiny.dsq"), change_tensors=TENSORS[case])
    assert "damaged" in one_line_dsq_error(dsq.load, path, skeleton=saved[1])


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64, torch.float16])
def test_a_batchnorm_buffer_of_another_dtype_does_not_fit(saved, tmp_path, dtype, one_line_dsq_error):
    path = rewrite(_copy(saved, tmp_path, "tiny.dsq"), change_tensors=_set("bn.running_mean", lambda t: t.to(dtype)))
    assert "bn.running_mean" in one_line_dsq_error(dsq.load, path, skeleton=saved[1])


# ---- a damaged .dsq says so, never "cannot tell the architecture" ------------------------------


@pytest.mark.parametrize("damage", ["key renamed", "header size", "junk", "cut"])
def test_a_damaged_dsq_is_reported_as_damaged(saved, tmp_path, damage):
    path = _copy(saved, tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "key renamed":
        data[data.index(b'"dsq"') + 3] ^= 0x01  # "dsq" -> "dsp": still JSON, no recipe
    elif damage == "header size":
        data[5] = 0x7F
    elif damage == "junk":
        data = bytearray(os.urandom(4096))
    else:
        data = data[:100]
    path.write_bytes(bytes(data))
    for command in (("eval", path, "--data", CIFAR, "--limit", 8), ("inspect", path)):
        line = error_line(run_dsq(*command))
        assert "cannot tell the architecture" not in line
        assert any(word in line for word in ("damaged", "truncated", "not a dsq model")), line


# ---- 4. a failed write ---------------------------------------------------------------------------

FULL_DISK = """
import resource, signal, sys, torch, dsq
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.Conv2d(64, 64, 3)).eval()
qmodel, report = dsq.quantize(model, rounds=0)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # the disk is full after 4 KiB
try:
    dsq.save(sys.argv[1], qmodel, report)
except dsq.DsqError as e:
    print(e)
"""


def test_a_full_disk_is_one_line_and_leaves_no_file(tmp_path):
    target = tmp_path / "out" / "m.dsq"
    target.parent.mkdir()
    result = subprocess.run([sys.executable, "-c", FULL_DISK, str(target)], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "cannot write" in lines[0] and str(target) in lines[0], result.stdout
    assert os.listdir(target.parent) == []


# ---- 5. float checkpoints --------------------------------------------------------------------------


def _poked(key, number):
    def change(state):
        state[key] = state[key].clone()
        state[key].view(-1)[0] = number

    return change


CHECKPOINTS = {
    "NaN weight": (_poked("conv1.weight", float("nan")), "conv1.weight"),
    "Inf BatchNorm variance": (_poked("layer2.1.bn1.running_var", float("inf")), "running_var"),
    "NaN classifier": (_poked("linear.bias", float("nan")), "linear.bias"),
    "int BatchNorm mean": (lambda s: s.update({"bn1.running_mean": torch.zeros(16, dtype=torch.int64)}), "int64"),
    "complex weight": (lambda s: s.update({"conv1.weight": s["conv1.weight"].to(torch.complex64)}), "complex"),
    "bool weight": (lambda s: s.update({"conv1.weight": s["conv1.weight"] > 0}), "bool"),
    "classifier without rows": (
        lambda s: s.update({"linear.weight": torch.zeros(0, 64), "linear.bias": torch.zeros(0)}),
        "rows",
    ),
}


@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_a_bad_float_checkpoint_is_refused_with_the_tensor(tmp_path, case, one_line_dsq_error):
    state = build_model("cifar_resnet20").state_dict()
    change, word = CHECKPOINTS[case]
    change(state)
    path = tmp_path / "resnet20.pth"
    torch.save(state, path)
    assert word in one_line_dsq_error(load_model, str(path))
    error_line(run_dsq("quantize", path), word)
