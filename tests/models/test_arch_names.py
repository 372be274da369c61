from pathlib import Path

import pytest
import torchvision

from dsq.models import build_model, known_archs
from dsq.models.registry import arch_from_filename


@pytest.mark.parametrize(
    "file_name, arch",
    [
        ("resnet50.pth", "resnet50"),
        ("resnet50-0676ba61.pth", "resnet50"),
        ("resnet18_custom.pt", "resnet18"),
        ("RESNET101.tar", "resnet101"),
        ("resnet20-12fca82f.th", "cifar_resnet20"),
        ("resnet110.pth", "cifar_resnet110"),
        ("efficientnet-lite0-57934424.pth", "efficientnet_lite0"),
        ("vgg11_bn-6002323d.pth", "vgg11_bn"),
        ("wide_resnet50_2.safetensors", "wide_resnet50_2"),
    ],
)
def test_arch_inferred_from_file_name(file_name, arch):
    assert arch_from_filename(Path(file_name)).name == arch


@pytest.mark.parametrize("file_name", ["model_best.pth", "resnet200.pth", "myresnet50.pth"])
def test_uninferable_file_name_asks_for_arch(one_line_dsq_error, file_name):
    message = one_line_dsq_error(arch_from_filename, Path(file_name))
    assert file_name in message and "--arch" in message and "resnet50" in message


def test_known_archs_cover_all_families():
    names = known_archs()
    assert set(torchvision.models.list_models(module=torchvision.models)) <= set(names)
    assert {"cifar_resnet20", "cifar_resnet110", "efficientnet_lite0", "efficientnet_lite2"} <= set(names)
    assert "resnet20" not in names  # an alias, not a canonical name


def test_unknown_arch_lists_close_matches(one_line_dsq_error):
    message = one_line_dsq_error(build_model, "resnet5O")
    assert "unknown architecture 'resnet5O'" in message and "resnet50" in message


def test_build_model_sizes_classifier_without_download():
    model = build_model("mobilenet_v2", num_classes=3)
    assert model.classifier[-1].out_features == 3 and not model.training
