"""Labelled image files: the dataset type that every dsq image source returns."""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import defaultdict
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DsqError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})


def is_image_name(name: str) -> bool:
    """True for a visible file name with an image extension (any case); skips '.DS_Store', '._x.jpg'."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


GREY_16_BIT = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
WITH_ALPHA = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
MAX_IMAGE_PIXELS = 2**25  # about 33.5 million (e.g. 6700x5000): decoding one takes up to ~400 MB
BACKGROUND = (255, 255, 255)  # transparent pixels are shown over white, as a browser page shows them


def _grey_to_8_bits(image: Image.Image) -> Image.Image:
    """A 16-bit grey image ('I;16', or 'I' holding 0..65535) or a float one ('F', 0..1) as 8-bit 'L'."""
    values = np.asarray(image)
    if image.mode == "F":
        eight = np.nan_to_num(values, nan=0.0).clip(0, 1) * 255 + 0.5
    else:
        eight = values.clip(0, 65535) >> 8
    return Image.fromarray(eight.astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as the 8-bit RGB picture a viewer shows: 16-bit and float grey scaled to 8 bits (not
    clipped to white), transparent pixels (alpha, or a palette's transparent colour) over white."""
    if image.mode in GREY_16_BIT or image.mode == "F":
        image = _grey_to_8_bits(image)
    if image.mode in WITH_ALPHA or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND), rgba)
    return image.convert("RGB")  # a loaded copy even when already RGB


def load_image(path: str | os.PathLike) -> Image.Image:
    """The image at `path` as RGB (`to_rgb`); DsqError naming the file when it cannot be decoded or
    has more than MAX_IMAGE_PIXELS (a decompression bomb: a small file declaring a huge image)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow's own, higher limit
            with Image.open(path) as image:
                if image.width * image.height <= MAX_IMAGE_PIXELS:
                    return to_rgb(image)
                reason = (
                    f"it has {image.width}x{image.height} pixels, over dsq's limit of {MAX_IMAGE_PIXELS} "
                    "(a decompression bomb?)"
                )
    # ImportError: once ultralytics is imported, its Image.open imports pi_heif for a format Pillow does not know
    except (Image.UnidentifiedImageError, ImportError):
        reason = "the file is empty" if os.path.getsize(path) == 0 else "not an image format Pillow can decode"
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        reason = f"it declares more than {Image.MAX_IMAGE_PIXELS} pixels (a decompression bomb?)"
    except (OSError, ValueError, SyntaxError, MemoryError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
    raise DsqError(f"cannot read image {path}: {reason}; replace or remove the file")


def file_identity(path: str | os.PathLike) -> tuple[int, int]:
    """(device, inode) of the file or folder at `path` after following links: equal for the same file."""
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def file_digest(path: str) -> bytes:
    """SHA-256 of the file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.digest()


class SameFiles:
    """A set of files that tells whether another path is one of them: the same file (through any
    link), or a byte-identical copy. Only files of a size in the set are hashed."""

    def __init__(self, paths: Iterable[str]):
        self.identities = set()
        self.by_size = defaultdict(list)
        for path in paths:
            stat = os.stat(path)
            self.identities.add((stat.st_dev, stat.st_ino))
            self.by_size[stat.st_size].append(path)
        self.digests: dict[int, set[bytes]] = {}

    def match(self, path: str) -> str | None:
        """'same' for one of the files, 'copy' for a byte-identical copy of one, else None (also when unreadable)."""
        try:
            stat = os.stat(path)
            if (stat.st_dev, stat.st_ino) in self.identities:
                return "same"
            if stat.st_size in self.by_size and file_digest(path) in self._digests(stat.st_size):
                return "copy"
        except OSError:
            pass
        return None

    def _digests(self, size: int) -> set[bytes]:
        if size not in self.digests:
            self.digests[size] = {file_digest(p) for p in self.by_size[size]}
        return self.digests[size]


class LabelledImages(Dataset):
    """Image files with integer labels; item i is (transform(RGB image), label).

    `samples` is the list of (path, label), `classes[label]` the class name, `source` where the
    images came from and `layout` how their labels were read (for messages and reports).
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        classes: Sequence[str],
        transform: Callable | None = None,
        *,
        source: str,
        layout: str,
    ):
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
        if self.transform is None:
            return image, label
        try:
            return self.transform(image), label
        except DsqError as error:  # e.g. the preset cannot resize an image this shape
            raise DsqError(f"image {path}: {error}") from None

    @property
    def targets(self) -> list[int]:
        """The label of every sample, in order."""
        return [label for _, label in self.samples]

    def without(self, paths, why: str) -> "LabelledImages":
        """A copy without the images at `paths`: the same files (however linked or named) and
        byte-identical copies of them; how many were left out, and why, is said in `describe`."""
        files = SameFiles(paths)
        matches = [files.match(path) for path, _ in self.samples]
        kept = [sample for sample, match in zip(self.samples, matches) if match is None]
        copy = type(self).__new__(type(self))
        copy.__dict__.update(self.__dict__, samples=kept)
        if len(kept) < len(self.samples):
            copies = matches.count("copy")
            of_them = f", {copies} of them byte-identical copies" if copies else ""
            copy.layout = f"{self.layout} ({len(self.samples) - len(kept)} {why} left out{of_them})"
        return copy

    def describe(self) -> str:
        """One line for the user, e.g. '10000 images, 10 classes, class folders in data/cifar10-test'."""
        return f"{len(self)} images, {len(self.classes)} classes, {self.layout} in {self.source}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"
