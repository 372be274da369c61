"""Flat folders of ImageNet images whose file names start with their wnid ('n01440764_tench.JPEG')."""

from __future__ import annotations

import os
from typing import Callable

from ..errors import DsqError
from .classes import ClassList, is_wnid, read_classes
from .folders import existing_folder
from .images import LabelledImages, is_image_name


def wnid_of(name: str) -> str | None:
    """The wnid a file name starts with ('n01440764_x.JPEG' -> 'n01440764'), or None."""
    head = name.split("_", 1)[0].split(".", 1)[0]
    return head if is_wnid(head) else None


class WnidFileDataset(LabelledImages):
    """Images directly in `root`, each labelled by the wnid its name starts with.

    `classes` (the model's classes in output order, e.g. the 1000 sorted ImageNet wnids) is
    required: the label of a file is the index of its wnid there.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None, classes: ClassList | None = None):
        root = existing_folder(root)
        if classes is None:
            raise DsqError(
                f"{root} holds images named by ImageNet wnid: pass --classes FILE listing the model's "
                "classes in output order (for ImageNet-1k the 1000 sorted wnids, one per line)"
            )
        names = read_classes(classes)
        label = {name: i for i, name in enumerate(names)}
        samples = []
        for name in sorted(n for n in os.listdir(root) if is_image_name(n)):
            wnid = wnid_of(name)
            if wnid is None:
                raise DsqError(
                    f"image {root / name} does not start with a wnid like n01440764_: "
                    "name every image <wnid>_..., or use one sub-folder per class"
                )
            if wnid not in label:
                raise DsqError(
                    f"image {root / name} has wnid {wnid}, which is not in the class list: "
                    "pass the class list that names it"
                )
            samples.append((str(root / name), label[wnid]))
        if not samples:
            raise DsqError(f"found 0 images in {root}: expected images named <wnid>_....JPEG")
        super().__init__(samples, names, transform, source=str(root), layout="wnid-named files")
