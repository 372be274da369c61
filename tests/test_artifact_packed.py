"""The packed dsq file: sizes against an independent theoretical minimum, bit-identical reloads,
scale dtypes, rebuilding by name or from a skeleton, and damaged or future files."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dsq
from dsq import artifact
from dsq.config import LayerRule, QuantConfig
from dsq.formats import DEFAULT_SCALE_DTYPE
from dsq.nn import is_dsconv

from zoo import build, example_input

BLOCK = 32
SCALE_BYTES = {"float16": 2, "float32": 4}


def _save(tmp_path, model, name="model.dsq", **quant):
    qmodel, report = dsq.quantize(model, **quant)
    path = tmp_path / name
    sizes = dsq.save(path, qmodel, report)
    return qmodel, path, sizes


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _tensor_nbytes(path) -> dict[str, int]:
    with safe_open(str(path), framework="pt") as f:
        return {k: (t := f.get_tensor(k)).numel() * t.element_size() for k in f.keys()}


def _float_part_bytes(model: nn.Module, quantized: set[str]) -> int:
    """Bytes of every state entry but the weights of the quantized layers."""
    skip = {f"{name}.weight" for name in quantized}
    return sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if k not in skip)


class SmallNet(nn.Module):
    """Ragged channel blocks (3 and 40 input channels), a depthwise conv, a bias, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 40, 3, padding=1, bias=False), nn.BatchNorm2d(40), nn.ReLU())
        self.dw = nn.Conv2d(40, 40, 3, padding=1, groups=40)
        self.pw = nn.Conv2d(40, 24, 1)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        return self.head(self.pw(self.dw(self.stem(x))).mean((2, 3)))


@pytest.fixture(scope="module")
def small_net() -> nn.Module:
    torch.manual_seed(0)
    return SmallNet().eval()


SMALL_X = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(5))


# ---- ResNet-50, 4 bits, block 32: the judged figures --------------------------------------------


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory):
    """torchvision ResNet-50 (random weights) at 4 bits, block 32, float16 scales, saved by name.

    rounds=0 only to save time: the refinement changes neither sizes nor the reload."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    qmodel, report = dsq.quantize(model, bits=4, block=BLOCK, rounds=0, scale_dtype="float16")
    path = tmp_path_factory.mktemp("r50") / "resnet50.dsq"
    sizes = dsq.save(path, qmodel, report, arch="resnet50", num_classes=1000)
    return model, qmodel, path, sizes


def _resnet50_minimum(model: nn.Module, scale_bytes: int) -> float:
    """The file's theoretical minimum in bytes, from the layer shapes alone: 4 bits per conv
    weight plus one scale per channel block of 32 at each (out channel, tap), and the float parts."""
    conv_min = 0.0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            o, i, kh, kw = m.weight.shape
            conv_min += m.weight.numel() * 4 / 8 + o * math.ceil(i / BLOCK) * kh * kw * scale_bytes
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    return conv_min + _float_part_bytes(model, convs)


def test_resnet50_conv_weights_take_6_5x_fewer_bytes_than_float32(resnet50_file):
    model, _, path, sizes = resnet50_file
    nbytes = _tensor_nbytes(path)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    float32 = sum(4 * model.get_submodule(n).weight.numel() for n in convs)
    in_file = sum(nbytes[f"{n}.vqk.packed"] + nbytes[f"{n}.kds"] for n in convs)
    assert float32 / in_file >= 6.5, float32 / in_file
    assert sizes.weight_ratio == pytest.approx(float32 / in_file)


def test_resnet50_file_is_within_2_percent_of_its_theoretical_minimum(resnet50_file):
    model, _, path, sizes = resnet50_file
    minimum = _resnet50_minimum(model, SCALE_BYTES["float16"])
    size = path.stat().st_size
    assert minimum <= size <= 1.02 * minimum, (size, minimum, size / minimum - 1)
    assert sizes.file_bytes == size and sizes.min_bytes == pytest.approx(minimum)


def test_resnet50_reload_by_name_gives_bit_identical_logits(resnet50_file):
    _, qmodel, path, _ = resnet50_file
    reloaded, recipe = dsq.load(path)
    assert recipe["arch"] == "resnet50"
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    assert torch.equal(_logits(reloaded, x), _logits(qmodel, x))


def test_loading_fits_nothing(resnet50_file, monkeypatch):
    """The skeleton's convs take the stored integers: no VQK/KDS fit runs."""

    def no_fit(*args, **kwargs):
        raise AssertionError("load ran a weight fit")

    monkeypatch.setattr("dsq.nn.dsconv.quantize_weight", no_fit)
    monkeypatch.setattr("dsq.formats.weights.quantize_weight", no_fit)
    model, _ = dsq.load(resnet50_file[2])
    assert sum(is_dsconv(m) for m in model.modules()) == 53


# ---- every bit width, both scale dtypes, small models ----------------------------------------


@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_every_bit_width_reloads_bit_identical_at_its_minimum_size(tmp_path, small_net, bits, scale_dtype):
    qmodel, path, sizes = _save(tmp_path, small_net, bits=bits, block=16, scale_dtype=scale_dtype, quantize_linear=True)
    reloaded, _ = dsq.load(path, skeleton=small_net)
    assert torch.equal(_logits(reloaded, SMALL_X), _logits(qmodel, SMALL_X))
    nbytes, layer_bits = _tensor_nbytes(path), []
    for name, m in small_net.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            q = qmodel.get_submodule(name)
            layer_bits.append(q.weight_format.bits)  # `bits`, or a per-kind default such as depthwise_bits
            assert nbytes[f"{name}.vqk.packed"] == math.ceil(m.weight.numel() * layer_bits[-1] / 8)
            assert nbytes[f"{name}.kds"] == q.kds.numel() * SCALE_BYTES[scale_dtype]
    assert bits in layer_bits and [r.bits for r in sizes.layers] == layer_bits


def test_float16_scales_are_rounded_at_quantize_time(small_net):
    q16, r16 = dsq.quantize(small_net, bits=4, scale_dtype="float16")
    q32, r32 = dsq.quantize(small_net, bits=4, scale_dtype="float32")
    for name in ("stem.0", "dw", "pw"):
        kds16, kds32 = q16.get_submodule(name).kds, q32.get_submodule(name).kds
        assert kds16.dtype == torch.float32 and torch.equal(kds16, kds32.half().float())
        assert torch.equal(q16.get_submodule(name).vqk, q32.get_submodule(name).vqk)
    for row16, row32 in zip(r16.quantized_layers, r32.quantized_layers):
        n, b, n_scales = row16.params, row16.bits, q16.get_submodule(row16.name).kds.numel()
        assert row16.packed_bytes == math.ceil(n * b / 8) + 2 * n_scales
        assert row32.packed_bytes == math.ceil(n * b / 8) + 4 * n_scales
        assert row16.bits_per_weight == pytest.approx(b + 16 * n_scales / n)
        assert row32.bits_per_weight == pytest.approx(b + 32 * n_scales / n)
    assert r16.config.weight.scale_dtype == "float16" and r32.config.weight.scale_dtype == "float32"


@pytest.mark.parametrize("scale_dtype", [None, "float16", "float32"])
def test_scales_are_stored_in_the_scale_dtype(tmp_path, small_net, scale_dtype):
    _, path, _ = _save(tmp_path, small_net, **({"scale_dtype": scale_dtype} if scale_dtype else {}))
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("pw.kds").dtype == getattr(torch, scale_dtype or DEFAULT_SCALE_DTYPE)
        assert f.get_tensor("pw.vqk.packed").dtype == torch.uint8
        assert f.get_tensor("pw.bias").dtype == torch.float32  # float parts as they are
        assert "pw.vqk" not in f.keys() and "pw.weight" not in f.keys()


def test_an_unknown_scale_dtype_is_refused(small_net, one_line_dsq_error):
    assert "bfloat16" in one_line_dsq_error(dsq.quantize, small_net, scale_dtype="bfloat16")


def test_saving_refuses_scales_the_file_cannot_hold_exactly(tmp_path, small_net, one_line_dsq_error):
    """The file keeps the scales in each layer's scale dtype; a model whose scales that dtype
    cannot hold exactly would not reload bit-identical."""
    qmodel, report = dsq.quantize(small_net, scale_dtype="float32")
    for _, layer in dsq.artifact.dsconv_layers(qmodel):
        layer.weight_format = replace(layer.weight_format, scale_dtype="float16")
    one_line_dsq_error(dsq.save, tmp_path / "m.dsq", qmodel, report)
    assert list(tmp_path.iterdir()) == []


# ---- the recipe and rebuilding -------------------------------------------------------------------


@pytest.fixture(scope="module")
def mobilenet_file(tmp_path_factory):
    """MobileNetV2 (depthwise convs: flat blocks) at 3 bits, block 16, KL float16 scales, last conv float."""
    model = build("mobilenet_v2")
    qmodel, report = dsq.quantize(
        model, bits=3, block=16, method="kl", exclude=("features.18.*",), scale_dtype="float16"
    )
    path = tmp_path_factory.mktemp("mnv2") / "m.dsq"
    dsq.save(path, qmodel, report, arch="mobilenet_v2", num_classes=10, accuracy=ACCURACY)
    return model, qmodel, report, path


ACCURACY = {"float": {"top1": 70.0, "images": 10}, "quantized": {"top1": 60.0, "images": 10}}


def test_recipe_says_how_every_layer_was_made(mobilenet_file):
    _, _, report, path = mobilenet_file
    recipe = artifact.read_recipe(path)
    assert recipe["dsq_version"] == dsq.__version__ and recipe["format_version"] == artifact.FORMAT_VERSION
    assert (recipe["arch"], recipe["num_classes"], recipe["accuracy"]) == ("mobilenet_v2", 10, ACCURACY)
    s = QuantConfig.from_dict(recipe["settings"])
    assert (s.weight.bits, s.weight.block, s.weight.method, s.weight.scale_dtype) == (3, 16, "kl", "float16")
    assert s.rules[1] == LayerRule(name="features.18.*", keep_float=True)
    layers = recipe["layers"]
    assert layers["features.1.conv.0.0"]["layout"] == "flat"  # depthwise
    assert layers["features.2.conv.0.0"]["layout"] == "channel"
    assert layers["features.0.0"]["act_format"] is None  # the image input
    assert layers["features.2.conv.0.0"]["act_format"] == {"bits": 8, "block": 16}
    assert "features.18.0" not in layers
    assert [r["name"] for r in recipe["report"]["layers"]] == [r.name for r in report.layers]


def test_recipe_settings_redo_the_run(tmp_path, small_net):
    qmodel, path, _ = _save(tmp_path, small_net, bits=5, block=8, layout="flat", act_bits=6)
    again, _ = dsq.quantize(small_net, QuantConfig.from_dict(artifact.read_recipe(path)["settings"]))
    assert torch.equal(_logits(again, SMALL_X), _logits(qmodel, SMALL_X))


def test_rebuild_by_name_and_from_a_skeleton(mobilenet_file):
    model, qmodel, _, path = mobilenet_file
    x = example_input("mobilenet_v2")
    by_name, _ = dsq.load(path)
    from_skeleton, _ = dsq.load(path, skeleton=model)
    want = _logits(qmodel, x)
    assert torch.equal(_logits(by_name, x), want) and torch.equal(_logits(from_skeleton, x), want)
    assert not any(is_dsconv(m) for m in model.modules())  # the skeleton itself is left float


def test_unnamed_architecture_needs_the_skeleton(tmp_path, small_net, one_line_dsq_error):
    _, path, _ = _save(tmp_path, small_net)
    assert "skeleton" in one_line_dsq_error(dsq.load, path)


def test_a_skeleton_that_does_not_fit_is_named(tmp_path, small_net, one_line_dsq_error):
    _, path, _ = _save(tmp_path, small_net)
    other = SmallNet()
    other.pw = nn.Conv2d(40, 16, 1)
    assert "pw" in one_line_dsq_error(dsq.load, path, skeleton=other)
    assert "stem" in one_line_dsq_error(dsq.load, path, skeleton=nn.Sequential(nn.Conv2d(3, 40, 3)))


# ---- damaged, foreign and future files ------------------------------------------------------------


@pytest.fixture
def small_file(tmp_path, small_net):
    return _save(tmp_path, small_net, bits=3)[1]


def _rewrite(path, change_recipe=None, change_tensors=None):
    """Write the file again with its recipe and/or tensors changed (and a matching checksum)."""
    recipe, tensors = artifact.read_recipe(path), load_file(str(path))
    if change_recipe:
        change_recipe(recipe)
    if change_tensors:
        change_tensors(tensors)
    recipe["sha256"] = artifact.checksum(recipe, tensors)
    save_file(tensors, str(path), metadata={"dsq": json.dumps(recipe)})


# The settings of a file written before versioned configs: dsq.quantize's arguments.
OLD_SETTINGS = {
    "bits": 3,
    "block": 32,
    "method": "l2",
    "rounds": 5,
    "sum_weight": 0.467,
    "layout": "auto",
    "act_bits": 8,
    "act_block": None,
    "include": ["*"],
    "exclude": [],
    "layer_bits": {},
    "depthwise_bits": 8,
    "quantize_linear": False,
    "quantize_image_input": False,
    "scale_dtype": "float16",
}


def _as_written_before_configs(recipe: dict) -> None:
    recipe["settings"] = recipe["report"]["settings"] = dict(OLD_SETTINGS)
    for layer in recipe["layers"].values():
        del layer["weight_format"]["scale_dtype"]  # the stored scales' dtype says it


def test_a_file_written_before_configs_loads_bit_identical(tmp_path, small_net):
    qmodel, path, _ = _save(tmp_path, small_net, bits=3)
    _rewrite(path, change_recipe=_as_written_before_configs)
    loaded, recipe = dsq.load(path, skeleton=small_net)
    assert torch.equal(_logits(loaded, SMALL_X), _logits(qmodel, SMALL_X))
    assert QuantConfig.from_dict(recipe["settings"]) == dsq.quantize(small_net, bits=3)[1].config
    assert all(
        m.weight_format == q.weight_format
        for (_, m), (_, q) in zip(artifact.dsconv_layers(loaded), artifact.dsconv_layers(qmodel))
    )
    assert "float16 KDS" in dsq.report.recipe_summary(recipe)


def test_a_config_from_a_newer_dsq_is_refused_with_its_version(small_file, one_line_dsq_error):
    _rewrite(small_file, change_recipe=lambda r: r["settings"].update(version=99))
    assert "version 99" in one_line_dsq_error(dsq.load, small_file)


def test_truncated_file(small_file, one_line_dsq_error):
    data = small_file.read_bytes()
    small_file.write_bytes(data[: len(data) - 100])
    assert artifact.is_dsq_file(small_file)  # still says what it is, so `dsq eval` reports the damage
    message = one_line_dsq_error(dsq.load, small_file)
    assert "truncated" in message and str(small_file) in message
    assert "truncated" in one_line_dsq_error(artifact.file_sizes, small_file)


def test_flipped_bits_in_the_tensors(small_file, one_line_dsq_error):
    data = bytearray(small_file.read_bytes())
    data[-5] ^= 0x10
    small_file.write_bytes(bytes(data))
    assert "damaged" in one_line_dsq_error(dsq.load, small_file)


@pytest.mark.parametrize("content", [b"", b"hello", b"\xff" * 64, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}!!!!!!"])
def test_not_a_safetensors_file(tmp_path, content, one_line_dsq_error):
    path = tmp_path / "junk.bin"
    path.write_bytes(content)
    assert not artifact.is_dsq_file(path)
    assert artifact.is_dsq_file(path.rename(tmp_path / "junk.dsq"))  # by its name: `dsq eval` says what is wrong
    assert "not a dsq model file" in one_line_dsq_error(dsq.load, tmp_path / "junk.dsq")


def test_a_safetensors_file_without_a_recipe(tmp_path, one_line_dsq_error):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    assert not artifact.is_dsq_file(tmp_path / "plain.safetensors")
    assert "not a dsq model" in one_line_dsq_error(dsq.load, tmp_path / "plain.safetensors")


def test_a_file_from_a_future_format_version(small_file, one_line_dsq_error):
    _rewrite(small_file, change_recipe=lambda r: r.update(format_version=artifact.FORMAT_VERSION + 1))
    assert artifact.is_dsq_file(small_file)
    message = one_line_dsq_error(dsq.load, small_file)
    assert "newer" in message and "upgrade dsq" in message
    one_line_dsq_error(artifact.read_recipe, small_file)


def test_a_missing_tensor(small_file, small_net, one_line_dsq_error):
    def drop(tensors):
        del tensors["dw.kds"]

    _rewrite(small_file, change_tensors=drop)
    message = one_line_dsq_error(dsq.load, small_file, skeleton=small_net)
    assert "damaged" in message and "dw.kds" in message


def test_a_file_cut_inside_its_header(small_file, one_line_dsq_error):
    small_file.write_bytes(small_file.read_bytes()[:200])
    assert artifact.is_dsq_file(small_file)  # so `dsq eval` says it is damaged, not "pass --arch"
    assert "truncated" in one_line_dsq_error(dsq.load, small_file)
