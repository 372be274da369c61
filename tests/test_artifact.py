"""The quantized model file: save, load, bit-identical round trips and one-line errors."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

import dsq
import dsq.artifact as artifact
from dsq.config import LayerRule, QuantConfig
from dsq.nn import is_dsconv

from zoo import ZOO, TinyYolo, build, convs, example_input, quantized


def _same_logits(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert torch.equal(ya, yb), (ya - yb).abs().max()


def _listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("name", ["cifar_resnet20", "resnet18"])
def test_round_trip_bit_identical(tmp_path, name):
    model, qmodel, report = quantized(name)
    entry = ZOO[name]
    path = tmp_path / f"{name}.dsq"
    artifact.save(path, qmodel, report, arch=entry.arch, num_classes=entry.num_classes)
    assert _listing(tmp_path) == [path.name]  # no temporary files left

    loaded, recipe = artifact.load(path)
    assert not loaded.training
    _same_logits(qmodel, loaded, example_input(name, seed=5))
    # same layers, same stored integers and scales, same float parts
    assert [n for n, m in loaded.named_modules() if is_dsconv(m)] == [n for n, _ in convs(model)]
    want, got = qmodel.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]), k
    for n, m in loaded.named_modules():
        if is_dsconv(m):
            src = qmodel.get_submodule(n)
            assert m.act_format == src.act_format and m.weight_format == src.weight_format
            assert m.layout == src.layout
    # the recipe holds the settings and the names needed to rebuild
    assert recipe["arch"] == entry.arch and recipe["num_classes"] == entry.num_classes
    assert recipe["settings"] == json.loads(json.dumps(report.config.to_dict()))
    weight = recipe["settings"]["weight"]
    assert weight["bits"] == 4 and weight["block"] == 32 and weight["rounds"] == 0
    assert artifact.read_recipe(path) == recipe
    # 4-bit codes + float16 scales on the convs: about 9/16 bytes per conv weight plus the float parts
    float_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    size = path.stat().st_size
    assert report.model_quantized_bytes <= size < 1.05 * report.model_quantized_bytes + 200_000
    if name == "resnet18":
        assert size < float_bytes / 5


def test_round_trip_mixed_settings(tmp_path):
    """Excluded (float) convs, a quantized linear, float activations, float32 scales."""
    model = build("cifar_resnet20")
    qmodel, report = dsq.quantize(
        model,
        bits=3,
        block=16,
        rounds=0,
        exclude=("layer1.*",),
        quantize_linear=True,
        act_bits=None,
        scale_dtype="float32",
    )
    path = tmp_path / "mixed.dsq"
    artifact.save(path, qmodel, report, arch="cifar_resnet20", num_classes=10)
    loaded, recipe = artifact.load(path)
    assert type(loaded.layer1[0].conv1) is nn.Conv2d
    assert is_dsconv(loaded.linear) and is_dsconv(loaded.layer2[0].conv1)
    assert all(m.act_format is None for m in loaded.modules() if is_dsconv(m))
    rules = QuantConfig.from_dict(recipe["settings"]).rules
    # linear layers quantized: no linear rule
    assert rules == (LayerRule(name="layer1.*", keep_float=True), LayerRule(kind="depthwise", bits=8))
    _same_logits(qmodel, loaded, example_input("cifar_resnet20"))


class TFSameConv(nn.Conv2d):
    """A conv subclass with its own forward (TF-style SAME padding), as EfficientNet ports have."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        ph = max((-(-ih // sh) - 1) * sh + kh - ih, 0)
        pw = max((-(-iw // sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Custom(nn.Module):
    """A model dsq cannot build by name: TinyYolo plus a conv subclass in front."""

    def __init__(self):
        super().__init__()
        self.pre = TFSameConv(3, 3, 3, stride=1)
        self.det = TinyYolo()

    def forward(self, x):
        return self.det(self.pre(x))


def test_custom_model_needs_skeleton(tmp_path, one_line_dsq_error):
    torch.manual_seed(0)
    model = Custom().eval()
    qmodel, report = dsq.quantize(model, bits=4, rounds=0)
    path = tmp_path / "custom.dsq"
    artifact.save(path, qmodel, report)
    msg = one_line_dsq_error(artifact.load, path)
    assert "skeleton" in msg
    torch.manual_seed(1)
    skeleton = Custom().eval()  # other weights: the file's replace them
    loaded, _ = artifact.load(path, skeleton=skeleton)
    assert isinstance(loaded.pre, TFSameConv) and is_dsconv(loaded.pre)
    x = torch.randn(2, 3, 64, 64)
    _same_logits(qmodel, loaded, x)
    # the skeleton passed in stays a float model
    assert not any(is_dsconv(m) for m in skeleton.modules())


def test_wrong_skeleton(tmp_path, one_line_dsq_error):
    _, qmodel, report = quantized("cifar_resnet20")
    path = tmp_path / "r20.dsq"
    artifact.save(path, qmodel, report, arch="cifar_resnet20", num_classes=10)
    one_line_dsq_error(artifact.load, path, skeleton=dsq.models.build_model("cifar_resnet32"))
    one_line_dsq_error(artifact.load, path, skeleton=dsq.models.build_model("cifar_resnet20", 7))


# --------------------------------------------------------------------------- bad files
def test_missing_file(tmp_path, one_line_dsq_error):
    msg = one_line_dsq_error(artifact.load, tmp_path / "nope.dsq")
    assert "nope.dsq" in msg


def test_folder_instead_of_file(tmp_path, one_line_dsq_error):
    one_line_dsq_error(artifact.load, tmp_path)


def test_plain_safetensors_file(tmp_path, one_line_dsq_error):
    path = tmp_path / "weights.safetensors"
    save_file({"conv.weight": torch.zeros(4, 3, 3, 3)}, str(path))
    msg = one_line_dsq_error(artifact.load, path)
    assert "dsq" in msg


@pytest.mark.parametrize("n_bytes", [0, 3, 8, 64, 4096])
def test_random_bytes(tmp_path, n_bytes, one_line_dsq_error):
    path = tmp_path / "random.dsq"
    path.write_bytes(os.urandom(n_bytes))
    one_line_dsq_error(artifact.load, path)


@pytest.mark.parametrize("recipe", ["{not json", "[1, 2]", '"text"', "{}"])
def test_damaged_recipe(tmp_path, recipe, one_line_dsq_error):
    path = tmp_path / "damaged.dsq"
    save_file({"a": torch.zeros(3)}, str(path), metadata={"dsq": recipe})
    one_line_dsq_error(artifact.load, path)


def _saved_r20(tmp_path):
    _, qmodel, report = quantized("cifar_resnet20")
    path = tmp_path / "r20.dsq"
    artifact.save(path, qmodel, report, arch="cifar_resnet20", num_classes=10)
    return path


def test_truncated_file(tmp_path, one_line_dsq_error):
    path = _saved_r20(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    one_line_dsq_error(artifact.load, path)


def test_corrupted_tensor_bytes(tmp_path, one_line_dsq_error):
    path = _saved_r20(tmp_path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # a byte of the last tensor's data
    path.write_bytes(bytes(data))
    one_line_dsq_error(artifact.load, path)


# --------------------------------------------------------------------------- writing safely
def test_save_into_missing_folder(tmp_path, one_line_dsq_error):
    _, qmodel, report = quantized("cifar_resnet20")
    target = tmp_path / "missing" / "r20.dsq"
    msg = one_line_dsq_error(artifact.save, target, qmodel, report, arch="cifar_resnet20", num_classes=10)
    assert "missing" in msg
    assert _listing(tmp_path) == []


def test_save_onto_folder(tmp_path, one_line_dsq_error):
    _, qmodel, report = quantized("cifar_resnet20")
    (tmp_path / "taken").mkdir()
    one_line_dsq_error(artifact.save, tmp_path / "taken", qmodel, report, arch="cifar_resnet20", num_classes=10)
    assert _listing(tmp_path) == ["taken"] and _listing(tmp_path / "taken") == []


def test_overwrite_and_failed_save_keep_folder_clean(tmp_path, one_line_dsq_error):
    model, qmodel, report = quantized("cifar_resnet20")
    path = _saved_r20(tmp_path)
    artifact.save(path, qmodel, report, arch="cifar_resnet20", num_classes=10)  # overwrite in place
    assert _listing(tmp_path) == [path.name]
    before = path.read_bytes()
    # scales that float16 cannot hold: saving must fail without touching the existing file
    broken = copy.deepcopy(qmodel)
    with torch.no_grad():
        broken.layer1[0].conv1.kds.add_(1e-5)
    one_line_dsq_error(artifact.save, path, broken, report, arch="cifar_resnet20", num_classes=10)
    assert _listing(tmp_path) == [path.name]
    assert path.read_bytes() == before
    loaded, _ = artifact.load(path)
    _same_logits(qmodel, loaded, example_input("cifar_resnet20"))
