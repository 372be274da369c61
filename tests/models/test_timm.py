"""timm's CNN families: each quantizes at W8 and W4, runs, and reloads bit-identically by its name;
at W8 its logits stay close to float. Plus the names, presets, layouts and refusals of timm models.

The models have random weights (nothing is downloaded): timm's own initialisation, with every
1-D parameter (norm scales and shifts, layer scales, gains) drawn at random, because timm starts
many of them at 0 or 1e-6 (the last BatchNorm of a residual branch, ConvNeXt's layer scale),
which would leave whole branches, and their convs, out of the output. BatchNorm keeps its default
statistics: re-estimating them on random images makes a random network chaotic (its output
SQNR at W8 then falls to 3-36 dB whatever the conversion does), which a trained one is not.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import dsq
from dsq.data import Preset, get_preset
from dsq.metrics import sqnr_db
from dsq.models import load_model
from dsq.models.registry import get_arch

timm = pytest.importorskip("timm", reason="timm models need the optional extra: pip install 'dsq[timm]'")

SIDE = 64  # input pixels: the smallest square every family below runs at
# name -> (what the family tests, W8 and W4 logits SQNR in dB as measured on this module's random
# models, with timm 1.0.31 and torch 2.14.1 on CPU); the floors are 6 dB below the measurements.
FAMILIES = {
    "resnet10t": ("ResNet", 40.5, 18.0),
    "resnext26ts": ("ResNeXt group convs", 55.6, 34.0),
    "regnetx_002": ("RegNetX group convs", 35.3, 17.3),
    "regnety_002": ("RegNetY group convs + SE", 40.7, 22.3),
    "convnext_atto": ("ConvNeXt 7x7 depthwise + LayerNorm", 40.6, 19.0),
    "convnextv2_atto": ("ConvNeXt-V2 + GRN", 38.8, 19.2),
    "ghostnet_050": ("GhostNet", 51.2, 33.6),
    "repghostnet_050": ("RepGhost, training form", 46.5, 28.2),
    "repvgg_a0": ("RepVGG, training form", 37.0, 14.6),
    "repvgg_a0:reparam": ("RepVGG, re-parameterised", 36.3, 11.4),
    "mobileone_s0:reparam": ("MobileOne, re-parameterised", 34.6, 15.4),
    "fastvit_t8": ("FastViT RepMixer", 58.7, 47.9),
    "repvit_m0_9": ("RepViT", 45.3, 32.4),
    "mobilenetv3_small_050": ("MobileNetV3 squeeze-excite", 53.2, 33.2),
    "tf_mobilenetv3_small_minimal_100": ("MobileNetV3 Conv2dSame", 27.6, 10.4),
    "tf_efficientnet_b0": ("EfficientNet SE + Conv2dSame", 51.3, 30.6),
    "tf_efficientnetv2_b0": ("EfficientNetV2 fused MBConv", 42.9, 21.7),
    "mixnet_s": ("MixNet mixed kernels", 42.9, 24.8),
    "mobilenetv4_conv_small": ("MobileNetV4 UIB", 29.7, 13.8),
    "lcnet_050": ("PP-LCNet", 59.0, 40.8),
    "hgnetv2_b0": ("PP-HGNetV2", 43.6, 24.5),
    "densenet121": ("DenseNet", 38.7, 17.1),
    "dla46_c": ("DLA", 33.5, 13.7),
    "cs3darknet_s": ("CSPDarkNet", 57.1, 36.7),
    "rexnet_100": ("ReXNet", 36.1, 17.9),
    "resnest14d": ("ResNeSt split attention", 44.6, 22.4),
    "skresnet18": ("SKNet selective kernels", 38.7, 20.7),
    "nf_regnet_b0": ("NF-RegNet ScaledStdConv2d", 45.6, 24.1),
    "ese_vovnet19b_slim_dw": ("VoVNet", 55.7, 35.0),
    "inception_next_atto": ("InceptionNeXt", 50.8, 28.1),
    "mambaout_femto": ("MambaOut gated convs", 36.8, 16.6),
    "starnet_s050": ("StarNet", 60.3, 38.1),
    "mobilevit_xxs": ("MobileViT hybrid", 29.8, 16.1),
    "gernet_s": ("GENet (ByobNet)", 33.7, 15.5),
}
MARGIN_DB = 6.0
# Families the fast tier runs (a second each); the others are marked slow (a minute together).
FAST = ("convnext_atto", "repvgg_a0:reparam", "tf_mobilenetv3_small_minimal_100", "lcnet_050")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These small models run faster on one thread than on two, and far faster (50 s against 300 s
    for the module) when another process keeps a core busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_model(name: str) -> nn.Module:
    """The timm model `name` (`<model>[:reparam]`) with random weights, in eval mode (fixed seed)."""
    model_name, _, form = name.partition(":")
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False)
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if parameter.ndim <= 1:
                parameter.normal_(0, 0.1) if key.endswith(("bias", "beta")) else parameter.uniform_(0.5, 1.5)
    model.eval()
    return timm.models.reparameterize_model(model, inplace=True) if form else model


def images(n: int = 2, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def logits_sqnr(reference: torch.Tensor, output: torch.Tensor) -> float:
    reference, output = reference.double(), output.double()
    return sqnr_db(reference.pow(2).sum().item(), (reference - output).pow(2).sum().item())


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in FAMILIES])
@torch.no_grad()
def test_family_quantizes_runs_and_reloads_by_name(name, tmp_path):
    _, w8_measured, w4_measured = FAMILIES[name]
    model, x = random_model(name), images()
    reference = model(x)
    measured = {}
    for bits in (8, 4):
        qmodel, report = dsq.quantize(model, bits=bits)
        convs = [m for m in qmodel.modules() if isinstance(m, nn.Conv2d)]
        assert convs and all(hasattr(m, "vqk") for m in convs), "a conv stayed float"
        output = qmodel(x)
        assert torch.isfinite(output).all()
        measured[bits] = logits_sqnr(reference, output)
    print(f"{name}: W8 {measured[8]:.1f} dB, W4 {measured[4]:.1f} dB")
    assert measured[8] >= w8_measured - MARGIN_DB
    assert measured[4] >= w4_measured - MARGIN_DB
    path = tmp_path / "model.dsq"
    dsq.save(path, qmodel, report, arch=f"timm/{name}", num_classes=reference.shape[1])
    loaded, _ = dsq.load(path)
    saved = qmodel.state_dict()
    assert all(torch.equal(tensor, saved[key]) for key, tensor in loaded.state_dict().items())
    assert torch.equal(loaded(x), output)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "levit_128s"])
def test_attention_only_models_are_refused(name, one_line_dsq_error):
    message = one_line_dsq_error(get_arch, f"timm/{name}")
    assert "attention-only" in message and "% of its weights" in message


@pytest.mark.parametrize(
    "name",
    [
        "mobilevit_xxs",  # attention, and convs hold 35 % of the weights: a hybrid
        "edgenext_xx_small",  # attention, convs 9 %
        "convnext_large",  # convs 3.8 % (its pointwise layers are Linear), but no attention
    ],
)
def test_hybrids_and_attention_free_models_are_accepted(name):
    assert get_arch(f"timm/{name}").name == f"timm/{name}"


def test_unknown_name_suggests_close_timm_names(one_line_dsq_error):
    assert "timm/resnet18" in one_line_dsq_error(get_arch, "timm/resnet_18")


def test_missing_timm_is_one_line_naming_the_extra(monkeypatch, one_line_dsq_error):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    for call in (get_arch, get_preset):
        assert "pip install 'dsq[timm]'" in one_line_dsq_error(call, "timm/resnet18")


def test_preset_comes_from_the_pretrained_cfg():
    preset = get_preset("timm/resnet50.a1_in1k")  # crop_pct 0.95, bicubic
    assert preset == Preset("timm/resnet50.a1_in1k", 235, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic")
    assert get_preset("timm/resnet50") == preset.replace(name="timm/resnet50")  # the default tag's
    lite = get_preset("timm/tf_efficientnet_lite0")
    assert (lite.resize, lite.crop, lite.mean, lite.interpolation) == (256, 224, (0.5,) * 3, "bicubic")
    assert get_preset("timm/resnet50").to_dict() == {**preset.to_dict(), "name": "timm/resnet50"}
    assert "crop_mode" not in preset.to_dict()  # the default mode: dsq files stay as before


def test_squash_preset_resizes_both_sides():
    from PIL import Image

    preset = get_preset("timm/convnext_tiny.fb_in22k_ft_in1k_384")
    assert (preset.resize, preset.crop, preset.crop_mode) == (384, 384, "squash")
    assert Preset.from_dict(preset.to_dict()) == preset
    out = preset.transform()(Image.new("RGB", (900, 300), (255, 0, 0)))
    assert out.shape == (3, 384, 384)  # the whole image, squashed: centre-cropping would keep a third
    centre = preset.replace(crop_mode="center").transform()(Image.new("RGB", (900, 300)))
    assert centre.shape == (3, 384, 384)


def test_checkpoint_sets_the_classes_and_keeps_the_preset(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("lcnet_050", num_classes=7).eval()
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    loaded = load_model("timm/lcnet_050", checkpoint=str(tmp_path / "weights.pth"))
    assert (loaded.arch, loaded.preset, loaded.num_classes) == ("timm/lcnet_050", "timm/lcnet_050", 7)
    assert loaded.source == str(tmp_path / "weights.pth")
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))


def test_reparameterised_checkpoint_builds_the_fused_form(tmp_path):
    fused = random_model("repvgg_a0:reparam")
    torch.save(fused.state_dict(), tmp_path / "fused.pth")
    loaded = load_model("timm/repvgg_a0", checkpoint=str(tmp_path / "fused.pth"))
    assert loaded.arch == "timm/repvgg_a0:reparam" and loaded.preset == "timm/repvgg_a0"
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded.model(x), fused(x))
