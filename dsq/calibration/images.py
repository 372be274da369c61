"""Calibration images: any folder of images, labels ignored, loaded once as one tensor."""

from __future__ import annotations

import os
from itertools import zip_longest
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data import LabelledImages
from ..data.folders import ImageWalk, existing_folder, subfolders
from ..errors import DsqError
from ..evaluate import _batches

DEFAULT_CALIB_IMAGES = 1000


def calibration_files(folder: str | os.PathLike, count: int = DEFAULT_CALIB_IMAGES) -> list[str]:
    """`count` image paths under `folder`, taken in turn from its sub-folders (each in sorted
    order), so that a class-folder test set gives the first count/k images of each class."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise DsqError(f"the number of calibration images must be a whole number of at least 1, got {count!r}")
    root = existing_folder(folder)
    folders = [root / name for name in subfolders(root)]
    walk = ImageWalk(root)
    groups = [*walk.in_folders(folders), walk.images(root, recursive=False)]
    ordered = [path for row in zip_longest(*groups) for path in row if path is not None]
    if not ordered:
        raise DsqError(f"found no images in calibration folder {root}: pass a folder of .jpg/.png images")
    return ordered[:count]


def load_images(
    paths: list[str], transform: Callable, *, workers: int = 0, progress: bool = False, batch_size: int = 64
) -> torch.Tensor:
    """The images at `paths`, each passed through `transform`, stacked into one (N, C, H, W) tensor."""
    dataset = LabelledImages(
        [(p, 0) for p in paths],
        ["unlabelled"],
        transform,
        source=str(Path(paths[0]).parent),
        layout="calibration images",
    )
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    batches = [
        x
        for x, _ in tqdm(
            _batches(loader), total=len(loader), desc="calibration images", unit="batch", disable=not progress
        )
    ]
    return torch.cat(batches)


def calibration_set(
    folder: str | os.PathLike,
    count: int,
    transform: Callable,
    dataset: LabelledImages | None = None,
    *,
    progress: bool = False,
) -> tuple[torch.Tensor, LabelledImages | None]:
    """`count` calibration images of `folder` (`calibration_files`) as one tensor, and `dataset`
    without them (None stays None): calibration never sees the images it is judged on."""
    files = calibration_files(folder, count)
    images = load_images(files, transform, progress=progress)
    return images, None if dataset is None else dataset.without(files, "calibration images")
