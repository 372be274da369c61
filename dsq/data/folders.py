"""Class-folder datasets: one sub-folder per class, images inside (ImageNet train/val style)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

from ..errors import DsqError
from .classes import ClassList, is_model_class_order, is_wnid, read_classes
from .images import LabelledImages, file_identity, is_image_name

IMAGENET_CLASSES = 1000


def existing_folder(root: str | os.PathLike) -> Path:
    """`root` as a Path; DsqError if it does not exist or is not a folder."""
    path = Path(root).expanduser()
    if not path.exists():
        raise DsqError(f"dataset folder {path} does not exist: check the path")
    if not path.is_dir():
        raise DsqError(
            f"dataset path {path} is a file, not a folder: pass the folder that holds one sub-folder per class"
        )
    return path


def subfolders(root: Path) -> list[str]:
    """Names of the visible sub-folders of `root` (symlinks followed), sorted."""
    with os.scandir(root) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())


class ImageWalk:
    """Lists the image files below `root`, following symlinks but walking every real folder once,
    so that links and link loops never repeat an image."""

    def __init__(self, root: str | os.PathLike):
        self.walked = {file_identity(root)}

    def in_folders(self, folders: Sequence[str | os.PathLike]) -> list[list[str]]:
        """The images under each of `folders` (e.g. the class folders): all count as walked first,
        so a link from one to another (or up to the root) does not pull its images in again, and a
        folder that is the root or an earlier one under another name lists nothing."""
        first = [_first_time(folder, self.walked) for folder in folders]
        return [self.images(folder) if new else [] for folder, new in zip(folders, first)]

    def images(self, folder: str | os.PathLike, recursive: bool = True) -> list[str]:
        """Paths of the images in `folder` (and, if `recursive`, its sub-folders) in sorted order,
        each real file once."""
        return self._images(folder, recursive, listed=set())

    def _images(self, folder, recursive: bool, listed: set) -> list[str]:
        found, below = [], []
        with os.scandir(folder) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    below.append(entry.path)
                elif is_image_name(entry.name) and _first_time(entry.path, listed):
                    found.append(entry.path)
        for path in below if recursive else ():
            if _first_time(path, self.walked):
                found += self._images(path, recursive, listed)
        return found


def _first_time(path: str, seen: set) -> bool:
    """True (and `path`'s real file remembered in `seen`) unless it was seen; True for a broken link,
    which stays listed so that loading it names it."""
    try:
        identity = file_identity(path)
    except OSError:
        return True
    if identity in seen:
        return False
    seen.add(identity)
    return True


def images_in_folders(root: Path, folders: Sequence[str]) -> list[list[str]]:
    """The image paths under each `root/folder` (sub-folders included), each real image once (`ImageWalk`)."""
    return ImageWalk(root).in_folders([root / f for f in folders])


def sorted_folder_labels(names: Sequence[str]) -> str:
    """How sorted-folder labels were assigned, said when the names are not a model's class names."""
    if is_model_class_order(names):
        return "class folders"
    shown = ", ".join(f"{name}={i}" for i, name in enumerate(names[:3]))
    more = f" ... {names[-1]}={len(names) - 1}" if len(names) > 3 else ""
    return (
        f"class folders, labels by sorted folder order: {shown}{more} "
        "(folder names are not CIFAR-10 class names or ImageNet wnids)"
    )


class ClassFolderDataset(LabelledImages):
    """Images in `root/<class>/...`; items are (transform(RGB image), label).

    The label of a folder is its index in `classes` (a list, or a text file whose line i names
    class i) when given, else its index among the sorted folder names (said in `describe` unless
    the names are CIFAR-10's or ImageNet wnids). ImageNet wnid folders without a class list are
    refused unless all 1000 are present, since a subset would be silently mis-labelled.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None, classes: ClassList | None = None):
        root = existing_folder(root)
        folders = subfolders(root)
        if classes is None:
            if folders and len(folders) < IMAGENET_CLASSES and all(map(is_wnid, folders)):
                raise DsqError(
                    f"{root} holds {len(folders)} ImageNet wnid folders, not all {IMAGENET_CLASSES}, so sorted-folder "
                    "labels would be wrong: pass --classes FILE listing the model's classes in output order "
                    "(for ImageNet-1k the 1000 sorted wnids, one per line)"
                )
            names, layout = folders, sorted_folder_labels(folders)
        else:
            names = read_classes(classes)
            listed = set(names)
            unknown = [f for f in folders if f not in listed]
            if unknown:
                raise DsqError(
                    f"folder {unknown[0]!r} in {root} is not in the class list ({len(unknown)} such folders): "
                    "remove it or pass the class list that names it"
                )
            layout = "class folders labelled by class list"
        label = {name: i for i, name in enumerate(names)}
        samples = [(path, label[f]) for f, paths in zip(folders, images_in_folders(root, folders)) for path in paths]
        if not samples:
            raise DsqError(f"found 0 images in {root}: expected one sub-folder per class with images inside")
        super().__init__(samples, names, transform, source=str(root), layout=layout)
