"""Preprocessing presets: the resize, crop and normalisation that match a model's weights."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from types import MappingProxyType

from PIL import Image
from torchvision import transforms

from ..errors import DsqError

INTERPOLATIONS = MappingProxyType({
    "nearest": transforms.InterpolationMode.NEAREST,
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "bicubic": transforms.InterpolationMode.BICUBIC,
})


class _ToRGB:
    """Convert a PIL image to RGB (a class, not a lambda, so DataLoader workers can pickle it)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == "RGB" else image.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


def _size(field: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise DsqError(f"preset {field} must be a positive whole number of pixels (or none), got {value!r}")
    return int(value)


def _channels(field: str, value) -> tuple[float, float, float]:
    raw = value.split(",") if isinstance(value, str) else value
    try:
        numbers_ = tuple(float(v) for v in raw)
    except (TypeError, ValueError):
        numbers_ = ()
    if len(numbers_) == 1:
        numbers_ *= 3
    if len(numbers_) != 3:
        raise DsqError(f"preset {field} must be 1 or 3 numbers (R,G,B), e.g. 0.485,0.456,0.406; got {value!r}")
    return numbers_


@dataclass(frozen=True)
class Preset:
    """How images are prepared for a model: resize (shorter side), centre crop, then normalise.

    `resize` or `crop` None skips that step. `mean`/`std` are per RGB channel on the [0, 1] scale.
    Values are validated and coerced on creation, so `replace(mean="0.5,0.5,0.5")` works.
    """

    name: str
    resize: int | None
    crop: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "resize", _size("resize", self.resize))
        set_(self, "crop", _size("crop", self.crop))
        set_(self, "mean", _channels("mean", self.mean))
        set_(self, "std", _channels("std", self.std))
        if any(s <= 0 for s in self.std):
            raise DsqError(f"preset std must be positive for every channel, got {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise DsqError(f"unknown interpolation {self.interpolation!r}: use one of {', '.join(INTERPOLATIONS)}")

    def replace(self, **changes) -> Preset:
        """A copy with some fields changed (None values are ignored, so CLI defaults pass through)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def transform(self) -> transforms.Compose:
        """The torchvision transform: PIL image -> normalised float tensor (3, H, W), RGB."""
        steps = [_ToRGB()]
        if self.resize is not None:
            steps.append(transforms.Resize(self.resize, interpolation=INTERPOLATIONS[self.interpolation],
                                           antialias=True))
        if self.crop is not None:
            steps.append(transforms.CenterCrop(self.crop))
        steps += [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]
        return transforms.Compose(steps)

    def to_dict(self) -> dict:
        """Plain JSON-ready fields; `Preset(**d)` rebuilds it."""
        return {**dataclasses.asdict(self), "mean": list(self.mean), "std": list(self.std)}


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_LITE_MEAN = (127 / 255,) * 3
_LITE_STD = (128 / 255,) * 3

PRESETS = MappingProxyType({p.name: p for p in (
    Preset("imagenet", 256, 224, _IMAGENET_MEAN, _IMAGENET_STD, "bilinear"),
    Preset("efficientnet_lite0", 256, 224, _LITE_MEAN, _LITE_STD, "bicubic"),
    Preset("efficientnet_lite1", 274, 240, _LITE_MEAN, _LITE_STD, "bicubic"),
    Preset("efficientnet_lite2", 297, 260, _LITE_MEAN, _LITE_STD, "bicubic"),
    Preset("cifar10", None, None, _IMAGENET_MEAN, _IMAGENET_STD, "bilinear"),
)})


def get_preset(name: str) -> Preset:
    """The preset called `name`; DsqError listing the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise DsqError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}") from None
