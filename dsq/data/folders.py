"""Class-folder datasets: one sub-folder per class, images inside (ImageNet train/val style)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ..errors import DsqError
from .classes import ClassList, is_wnid, read_classes
from .images import LabelledImages, is_image_name

IMAGENET_CLASSES = 1000


def existing_folder(root: str | os.PathLike) -> Path:
    """`root` as a Path; DsqError if it does not exist or is not a folder."""
    path = Path(root).expanduser()
    if not path.exists():
        raise DsqError(f"dataset folder {path} does not exist: check the path")
    if not path.is_dir():
        raise DsqError(f"dataset path {path} is a file, not a folder: "
                       "pass the folder that holds one sub-folder per class")
    return path


def subfolders(root: Path) -> list[str]:
    """Names of the visible sub-folders of `root` (symlinks followed), sorted."""
    with os.scandir(root) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())


def images_under(folder: str) -> list[str]:
    """Paths of the image files in `folder` and its sub-folders, in sorted (deterministic) order."""
    found = []
    for here, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(here, name) for name in sorted(files) if is_image_name(name)]
    return found


class ClassFolderDataset(LabelledImages):
    """Images in `root/<class>/...`; items are (transform(RGB image), label).

    The label of a folder is its index in `classes` (a list, or a text file whose line i names
    class i) when given, else its index among the sorted folder names. ImageNet wnid folders
    without a class list are refused unless all 1000 are present, since a subset would be
    silently mis-labelled.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 classes: ClassList | None = None):
        root = existing_folder(root)
        folders = subfolders(root)
        if classes is None:
            if folders and len(folders) < IMAGENET_CLASSES and all(map(is_wnid, folders)):
                raise DsqError(
                    f"{root} holds {len(folders)} ImageNet wnid folders, not all {IMAGENET_CLASSES}, so sorted-folder "
                    "labels would be wrong: pass --classes FILE listing the model's classes in output order "
                    "(for ImageNet-1k the 1000 sorted wnids, one per line)")
            names, layout = folders, "class folders"
        else:
            names = read_classes(classes)
            listed = set(names)
            unknown = [f for f in folders if f not in listed]
            if unknown:
                raise DsqError(
                    f"folder {unknown[0]!r} in {root} is not in the class list ({len(unknown)} such folders): "
                    "remove it or pass the class list that names it")
            layout = "class folders labelled by class list"
        label = {name: i for i, name in enumerate(names)}
        samples = [(path, label[f]) for f in folders for path in images_under(os.path.join(root, f))]
        if not samples:
            raise DsqError(f"found 0 images in {root}: expected one sub-folder per class with images inside")
        super().__init__(samples, names, transform, source=str(root), layout=layout)
