"""Labelled image files: the dataset type that every dsq image source returns."""

from __future__ import annotations

import os
from typing import Callable, Sequence

from PIL import Image
from torch.utils.data import Dataset

from ..errors import DsqError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})


def is_image_name(name: str) -> bool:
    """True for a visible file name with an image extension (any case); skips '.DS_Store', '._x.jpg'."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def load_image(path: str | os.PathLike) -> Image.Image:
    """The image at `path` as RGB; DsqError naming the file when it cannot be decoded."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Image.UnidentifiedImageError:
        reason = "not an image format Pillow can decode"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
    raise DsqError(f"cannot read image {path}: {reason}; replace or remove the file")


class LabelledImages(Dataset):
    """Image files with integer labels; item i is (transform(RGB image), label).

    `samples` is the list of (path, label), `classes[label]` the class name, `source` where the
    images came from and `layout` how their labels were read (for messages and reports).
    """

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str],
                 transform: Callable | None = None, *, source: str, layout: str):
        self.samples = list(samples)
        self.classes = list(classes)
        self.transform = transform
        self.source = str(source)
        self.layout = layout

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = load_image(path)
        return (self.transform(image) if self.transform is not None else image), label

    @property
    def targets(self) -> list[int]:
        """The label of every sample, in order."""
        return [label for _, label in self.samples]

    def without(self, paths, why: str) -> "LabelledImages":
        """A copy without the images at `paths` (compared as absolute paths); `why` is said in `describe`."""
        drop = {os.path.abspath(p) for p in paths}
        kept = [(p, label) for p, label in self.samples if os.path.abspath(p) not in drop]
        copy = type(self).__new__(type(self))
        copy.__dict__.update(self.__dict__, samples=kept)
        if len(kept) < len(self.samples):
            copy.layout = f"{self.layout} ({len(self.samples) - len(kept)} {why} left out)"
        return copy

    def describe(self) -> str:
        """One line for the user, e.g. '10000 images, 10 classes, class folders in data/cifar10-test'."""
        return f"{len(self)} images, {len(self.classes)} classes, {self.layout} in {self.source}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"
