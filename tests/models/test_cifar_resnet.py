from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import normalize, to_tensor

from dsq.models import build_model, load_model

CHECKPOINTS = {
    20: "resnet20-12fca82f.th",
    32: "resnet32-d509ac18.th",
    44: "resnet44-014dd654.th",
    56: "resnet56-4bfd9763.th",
}
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_depth_counts_weighted_layers(depth):
    model = build_model(f"cifar_resnet{depth}")
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == depth
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_option_a_shortcut_has_no_parameters_and_pads_channels():
    model = build_model("resnet20", num_classes=100)
    assert not any("shortcut" in name for name in model.state_dict())
    assert model.layer2[0].shortcut(torch.ones(1, 16, 32, 32)).shape == (1, 32, 16, 16)
    assert model.linear.out_features == 100


@pytest.mark.realdata
@pytest.mark.parametrize("depth", sorted(CHECKPOINTS))
def test_published_checkpoints_load_with_inferred_arch(shared_data, depth):
    path = shared_data / "cifar10-resnet" / CHECKPOINTS[depth]
    loaded = load_model(str(path))
    assert (loaded.arch, loaded.preset, loaded.num_classes) == (f"cifar_resnet{depth}", "cifar10", 10)
    assert loaded.known_top1 is None
    assert not loaded.model.training
    original = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(loaded.model.linear.weight, original["module.linear.weight"])
    assert loaded.model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def _cifar_batch(root: Path, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        for index in range(per_class):
            image = to_tensor(Image.open(root / name / f"{index:04d}.jpg").convert("RGB"))
            images.append(normalize(image, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


@pytest.mark.realdata
def test_resnet20_classifies_real_cifar_images(shared_data):
    model = load_model(str(shared_data / "cifar10-resnet" / CHECKPOINTS[20])).model
    images, labels = _cifar_batch(shared_data / "cifar10-test", per_class=5)
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.6
