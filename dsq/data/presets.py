"""Preprocessing presets: the resize, crop and normalisation that match a model's weights."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from PIL import Image
from torchvision import transforms

from ..errors import DsqError
from .images import to_rgb

INTERPOLATIONS = MappingProxyType(
    {
        "nearest": transforms.InterpolationMode.NEAREST,
        "bilinear": transforms.InterpolationMode.BILINEAR,
        "bicubic": transforms.InterpolationMode.BICUBIC,
    }
)


CROP_MODES = ("center", "squash")
OPTIONAL_FIELDS = ("interpolation", "crop_mode")  # fields a preset written by dsq may leave out

MAX_SIDE = 1024  # pixels of a resize or crop: above any CNN classifier's input (<= 800), and a batch of 64
# such 3-channel float images still fits in under 1 GB
MAX_PIXELS = 4 * 2**20  # the most pixels an image may have after resizing, or uncropped without a resize


class _ToRGB:
    """Convert a PIL image to RGB (a class, not a lambda, so DataLoader workers can pickle it)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == "RGB" else to_rgb(image)

    def __repr__(self) -> str:
        return "ToRGB()"


@dataclass(frozen=True)
class _SizeCheck:
    """Refuses (DsqError) an image that the next steps would turn into more than MAX_PIXELS pixels:
    one of an extreme aspect ratio (1x20000) resized on its shorter side, or a huge one neither
    resized nor cropped."""

    resize: int | None
    crop: int | None
    squash: bool = False

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        short, long = sorted((width, height))
        if self.resize is not None and not self.squash and self.resize * self.resize * long > MAX_PIXELS * short:
            raise DsqError(
                f"its {width}x{height} pixels resized to {self.resize} on the shorter side would make "
                f"over {MAX_PIXELS} pixels: crop it to a usual aspect ratio or remove it"
            )
        if self.resize is None and self.crop is None and width * height > MAX_PIXELS:
            raise DsqError(
                f"its {width}x{height} pixels are over {MAX_PIXELS} and the preset neither resizes nor "
                "crops: set --resize/--crop or remove it"
            )
        return image


def _size(field: str, value) -> int | None:
    """A resize/crop side: None, or a whole number of pixels in 1..MAX_SIDE (digits in a string too)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= len(str(MAX_SIDE)):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= MAX_SIDE:
        raise DsqError(f"preset {field} must be a whole number of pixels from 1 to {MAX_SIDE} (or none), got {value!r}")
    return int(value)


# field -> (its range on the [0, 1] pixel scale, in words; whether a value is in it; an example)
_CHANNEL_FIELDS = MappingProxyType(
    {
        "mean": ("from 0 to 1", lambda v: 0 <= v <= 1, "0.485,0.456,0.406"),
        "std": ("above 0 up to 1", lambda v: 0 < v <= 1, "0.229,0.224,0.225"),
    }
)


def _channels(field: str, value) -> tuple[float, float, float]:
    """1 or 3 numbers (a list, or a string '0.5,0.4,0.3') as 3 numbers, each in the field's range
    (NaN and infinity are in none; values on the 0-255 scale are refused)."""
    raw = value.split(",") if isinstance(value, str) else value
    try:
        numbers_ = tuple(float(v) for v in raw if not isinstance(v, bool))
    except (TypeError, ValueError, OverflowError):
        numbers_ = ()
    if len(numbers_) == 1:
        numbers_ *= 3
    words, fits, example = _CHANNEL_FIELDS[field]
    if len(numbers_) != 3 or not all(map(fits, numbers_)):
        raise DsqError(
            f"preset {field} must be 1 or 3 numbers (R,G,B) {words} on the [0, 1] pixel scale, "
            f"e.g. {example}; got {value!r}"
        )
    return numbers_


@dataclass(frozen=True)
class Preset:
    """How images are prepared for a model: resize (shorter side), centre crop, then normalise.

    `resize` or `crop` None skips that step. `mean`/`std` are per RGB channel on the [0, 1] scale.
    `crop_mode` "squash" (timm's) resizes both sides to `resize`, aspect ratio not kept.
    Values are validated and coerced on creation, so `replace(mean="0.5,0.5,0.5")` works.
    """

    name: str
    resize: int | None
    crop: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    crop_mode: str = "center"

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "resize", _size("resize", self.resize))
        set_(self, "crop", _size("crop", self.crop))
        set_(self, "mean", _channels("mean", self.mean))
        set_(self, "std", _channels("std", self.std))
        if not isinstance(self.name, str) or not self.name:
            raise DsqError(f"a preset's name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.interpolation, str) or self.interpolation not in INTERPOLATIONS:
            raise DsqError(f"unknown interpolation {self.interpolation!r}: use one of {', '.join(INTERPOLATIONS)}")
        if self.crop_mode not in CROP_MODES:
            raise DsqError(f"unknown crop mode {self.crop_mode!r}: use one of {', '.join(CROP_MODES)}")

    def replace(self, **changes) -> Preset:
        """A copy with some fields changed (None values are ignored, so CLI defaults pass through)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def transform(self) -> transforms.Compose:
        """The torchvision transform: PIL image -> normalised float tensor (3, H, W), RGB."""
        squash = self.crop_mode == "squash"
        steps = [_ToRGB(), _SizeCheck(self.resize, self.crop, squash)]
        if self.resize is not None:
            size = (self.resize, self.resize) if squash else self.resize
            steps.append(transforms.Resize(size, interpolation=INTERPOLATIONS[self.interpolation], antialias=True))
        if self.crop is not None:
            steps.append(transforms.CenterCrop(self.crop))
        steps += [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]
        return transforms.Compose(steps)

    def to_dict(self) -> dict:
        """Plain JSON-ready fields; `Preset.from_dict` (or `Preset(**d)`) rebuilds it. The default
        crop mode is left out, so a preset without one writes what dsq wrote before it had them."""
        fields = {**dataclasses.asdict(self), "mean": list(self.mean), "std": list(self.std)}
        if self.crop_mode == "center":
            del fields["crop_mode"]
        return fields

    @classmethod
    def from_dict(cls, fields, where: str = "the preset") -> Preset:
        """The preset that `to_dict` wrote (e.g. read back from a file), every field validated;
        DsqError naming `where` when it is not a mapping of exactly these fields or a value is bad."""
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(fields, Mapping):
            raise DsqError(f"{where} must be a mapping of {', '.join(names)}; got {type(fields).__name__}")
        unknown = sorted(set(map(str, fields)) - set(names))
        missing = [name for name in names if name not in fields and name not in OPTIONAL_FIELDS]
        if unknown or missing:
            what = f"unknown field {unknown[0]!r}" if unknown else f"no {missing[0]!r} field"
            raise DsqError(f"{where} has {what}: a preset has the fields {', '.join(names)}")
        try:
            return cls(**fields)
        except DsqError as error:
            raise DsqError(f"{where}: {error}") from None


TIMM_PREFIX = "timm/"  # names of timm models and of their presets
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_LITE_MEAN = (127 / 255,) * 3
_LITE_STD = (128 / 255,) * 3

PRESETS = MappingProxyType(
    {
        p.name: p
        for p in (
            Preset("imagenet", 256, 224, _IMAGENET_MEAN, _IMAGENET_STD, "bilinear"),
            Preset("efficientnet_lite0", 256, 224, _LITE_MEAN, _LITE_STD, "bicubic"),
            Preset("efficientnet_lite1", 274, 240, _LITE_MEAN, _LITE_STD, "bicubic"),
            Preset("efficientnet_lite2", 297, 260, _LITE_MEAN, _LITE_STD, "bicubic"),
            Preset("cifar10", None, None, _IMAGENET_MEAN, _IMAGENET_STD, "bilinear"),
        )
    }
)


def get_preset(name: str) -> Preset:
    """The preset called `name`: one of PRESETS, or `timm/<model>` (that timm model's own); DsqError
    listing the known names otherwise."""
    if name.strip().lower().startswith(TIMM_PREFIX):
        return _timm_preset(name)
    try:
        return PRESETS[name]
    except KeyError:
        raise DsqError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)} or timm/<model>") from None


def _timm_preset(name: str) -> Preset:
    """The preprocessing of timm's eval transform for a timm model, from its pretrained_cfg: resize
    to crop / crop_pct, crop (centre, or squash), mean, std and interpolation."""
    from ..models.timm_zoo import data_config  # imported here: timm loads only for its models

    name, config = data_config(name)
    crop = config["input_size"][-1]
    return Preset(
        name=name,
        resize=math.floor(crop / config["crop_pct"]),
        crop=crop,
        mean=config["mean"],
        std=config["std"],
        interpolation=config["interpolation"],
        crop_mode="squash" if config["crop_mode"] == "squash" else "center",  # timm's rare "border": centre
    )
