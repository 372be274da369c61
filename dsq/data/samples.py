"""Where labelled images come from: the built-in demo images, or a folder given by the user."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Callable

from ..errors import DsqError
from .classes import CIFAR10_CLASSES, ClassList, is_model_class_order, read_classes
from .flat import WnidFileDataset, wnid_of
from .folders import ClassFolderDataset, existing_folder, subfolders
from .imagenet import kaggle_val_below, labelled_val_folder, open_imagenet
from .images import LabelledImages, is_image_name

# name -> class names; the files are foolbox/data/<name>_<NN>_<label>.<ext>
DEMO_SETS = {
    "imagenet": tuple(str(i) for i in range(1000)),  # the wheel ships class indices, not names
    "cifar10": CIFAR10_CLASSES,
}

KNOWN_LAYOUTS = (
    "one sub-folder per class with images inside, images named <wnid>_*.JPEG, ImageNet val ILSVRC2012_val_*.JPEG "
    "with Kaggle's LOC_val_solution.csv or with the devkit's ILSVRC2012_validation_ground_truth.txt and meta.mat, "
    "or a torchvision ImageNet root (meta.bin and val/)"
)

_INSTALL = "the demo images come from the foolbox package: pip install 'dsq[demo]'"


def demo_folder() -> Path:
    """The folder of sample images inside the installed foolbox package (foolbox is not imported)."""
    try:
        spec = importlib.util.find_spec("foolbox")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(location) / "data"
        if folder.is_dir():
            return folder
    raise DsqError(_INSTALL)


def demo_dataset(transform: Callable | None = None, name: str = "imagenet") -> LabelledImages:
    """The 20 labelled demo images of `name` ('imagenet': 512x512 JPEGs, 'cifar10': 32x32 PNGs)."""
    if name not in DEMO_SETS:
        raise DsqError(f"unknown demo image set {name!r}: use one of {', '.join(DEMO_SETS)}")
    folder = demo_folder()
    pattern = re.compile(rf"{name}_(\d+)_(\d+)\.(?:jpg|png)")
    found = sorted(
        (int(m.group(1)), int(m.group(2)), str(folder / m.group(0)))
        for m in map(pattern.fullmatch, os.listdir(folder))
        if m
    )
    if not found:
        raise DsqError(f"no {name} demo images in {folder}: reinstall them with pip install 'dsq[demo]'")
    samples = [(path, label) for _, label, path in found]
    return LabelledImages(samples, DEMO_SETS[name], transform, source=str(folder), layout=f"{name} demo images")


def open_dataset(
    path: str | os.PathLike, transform: Callable | None = None, classes: ClassList | None = None
) -> LabelledImages:
    """The labelled images in folder `path`, whose layout is detected.

    ImageNet val in one of its published layouts -> `open_imagenet`; one sub-folder per class ->
    ClassFolderDataset; images directly inside named '<wnid>_...' -> WnidFileDataset; anything
    else -> DsqError naming the layouts dsq reads.
    """
    root = existing_folder(path)
    imagenet = open_imagenet(root, transform, classes)
    if imagenet is not None:
        return imagenet
    if not subfolders(root):
        flat = [name for name in os.listdir(root) if is_image_name(name)]
        if flat and all(map(wnid_of, flat)):
            return WnidFileDataset(root, transform, classes)
        raise DsqError(
            f"found {len(flat)} images in {root} but no class sub-folders or label file: dsq reads {KNOWN_LAYOUTS}"
        )
    _refuse_folder_above(root, classes)
    return ClassFolderDataset(root, transform, classes)


def _datasets_below(root: Path) -> list[Path]:
    """The folders just below `root` (or Kaggle's val folder inside it) that are themselves datasets:
    Kaggle's top folder, labelled ImageNet val images, CIFAR-10 or ImageNet wnid class folders."""
    found = []
    for name in subfolders(root):
        folder = root / name
        inner = subfolders(folder)
        if kaggle_val_below(folder) or labelled_val_folder(folder) or (inner and is_model_class_order(inner)):
            found.append(folder)
    kaggle_val = kaggle_val_below(root)
    return found or ([kaggle_val] if kaggle_val else [])


def _refuse_folder_above(root: Path, classes: ClassList | None) -> None:
    """DsqError when `root`'s sub-folders are not classes (not the class list's, nor a model's own
    names) but one of them holds a dataset: --data is one folder too high."""
    folders = subfolders(root)
    if is_model_class_order(folders) or (classes is not None and set(folders) <= set(read_classes(classes))):
        return
    below = _datasets_below(root)
    if below:
        where = " or ".join(f"--data {folder}" for folder in below[:3])
        raise DsqError(f"{root} is one folder above the images, not one sub-folder per class: did you mean {where}?")
