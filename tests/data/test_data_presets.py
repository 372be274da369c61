import dataclasses
import pickle

import pytest
import torch
from PIL import Image

from dsq.data import PRESETS, Preset, get_preset
from dsq.errors import DsqError

from conftest import one_line


def test_known_presets():
    assert set(PRESETS) == {"imagenet", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "cifar10"}
    lite1, lite2 = get_preset("efficientnet_lite1"), get_preset("efficientnet_lite2")
    assert (lite1.resize, lite1.crop, lite2.resize, lite2.crop) == (274, 240, 297, 260)
    assert lite1.interpolation == lite2.interpolation == "bicubic"
    assert get_preset("imagenet").interpolation == "bilinear"


@pytest.mark.parametrize(
    "name, size",
    [("imagenet", 224), ("efficientnet_lite0", 224), ("efficientnet_lite1", 240), ("efficientnet_lite2", 260)],
)
def test_output_shape_from_any_image(name, size):
    out = get_preset(name).transform()(Image.new("L", (500, 375), 128))  # grey, landscape
    assert out.shape == (3, size, size) and out.dtype == torch.float32


def test_cifar_keeps_size():
    assert get_preset("cifar10").transform()(Image.new("RGB", (32, 32))).shape == (3, 32, 32)


@pytest.mark.parametrize("name", ["imagenet", "cifar10", "efficientnet_lite0"])
def test_constant_image_normalised(name):
    preset = get_preset(name)
    rgb = (255, 128, 0)
    out = preset.transform()(Image.new("RGB", (300, 300), rgb))
    for c in range(3):
        expected = (rgb[c] / 255 - preset.mean[c]) / preset.std[c]
        assert torch.allclose(out[c], torch.full_like(out[c], expected), atol=1e-5)


def test_lite_mean_std():
    out = get_preset("efficientnet_lite0").transform()(Image.new("RGB", (256, 256), (127, 255, 0)))
    assert out[0].abs().max() < 1e-6  # 127 is the mean
    assert torch.allclose(out[1], torch.full_like(out[1], 1.0))
    assert torch.allclose(out[2], torch.full_like(out[2], -127 / 128))


def test_overrides():
    base = get_preset("imagenet")
    custom = base.replace(resize=64, crop="48", mean="0.5,0.5,0.5", std=[0.25], interpolation="bicubic")
    assert (custom.resize, custom.crop, custom.mean, custom.std) == (64, 48, (0.5,) * 3, (0.25,) * 3)
    assert base.resize == 256  # frozen original untouched
    assert base.replace(resize=None, crop=None) == base  # None = keep (CLI defaults)
    assert dataclasses.replace(base, crop=None).crop is None  # explicit removal of a step
    out = custom.transform()(Image.new("RGB", (100, 80), (255, 255, 255)))
    assert out.shape == (3, 48, 48) and torch.allclose(out, torch.full_like(out, 2.0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.crop = 1


def test_round_trip_and_pickle():
    preset = get_preset("efficientnet_lite2")
    assert Preset(**preset.to_dict()) == preset
    assert pickle.loads(pickle.dumps(preset.transform()))  # usable by DataLoader workers


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(resize=0), "resize"),
        (dict(crop=-3), "crop"),
        (dict(crop=2.5), "crop"),
        (dict(mean="1,2"), "mean"),
        (dict(mean="a,b,c"), "mean"),
        (dict(std=(0.1, 0, 0.1)), "std"),
        (dict(interpolation="lanczos"), "bicubic"),
    ],
)
def test_bad_overrides(changes, words):
    with pytest.raises(DsqError) as error:
        get_preset("imagenet").replace(**changes)
    assert words in one_line(error)


def test_unknown_preset_lists_names():
    with pytest.raises(DsqError) as error:
        get_preset("resnet")
    message = one_line(error)
    assert "'resnet'" in message and all(name in message for name in PRESETS)
