"""ImageNet val in the layouts it is published in: Kaggle's CSV, the devkit's ground truth, torchvision's root.

Each layout says which wnid every image shows. The label of a wnid is its index in the class
list: `classes` when given, else the sorted wnids read from the metadata (meta.mat, meta.bin,
LOC_synset_mapping.txt), the order torchvision-style models predict. The devkit's own class
IDs (ILSVRC2012_ID) are not that order: they are only keys into meta.mat.
"""

from __future__ import annotations

import csv
import io
import os
import pickle
import re
import tarfile
from pathlib import Path
from typing import Callable

import torch
from scipy.io import loadmat
from scipy.io.matlab import MatReadError

from ..errors import DsqError
from .classes import ClassList, read_classes
from .folders import images_in_folders, subfolders
from .images import LabelledImages, is_image_name

VAL_IMAGE = re.compile(r"ILSVRC2012_val_(\d{8})\.jpe?g", re.IGNORECASE)
DEVKIT = "ILSVRC2012_devkit_t12"
DEVKIT_TAR = f"{DEVKIT}.tar.gz"
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
META_MAT = "meta.mat"
META_BIN = "meta.bin"  # what torchvision.datasets.ImageNet parses the devkit into
KAGGLE_CSV = "LOC_val_solution.csv"
KAGGLE_SYNSETS = "LOC_synset_mapping.txt"
KAGGLE_VAL = Path("ILSVRC", "Data", "CLS-LOC", "val")
SEARCH_UP = 4  # metadata is looked for in the image folder and this many folders above it (Kaggle's depth)


def folders_above(root: Path) -> list[Path]:
    """`root` and the SEARCH_UP folders above it: as named, then (when `root` is reached through a
    link) those above the real folder."""
    named, real = root.absolute(), root.resolve()
    folders = [named, *named.parents][: SEARCH_UP + 1]
    return folders + [f for f in [real, *real.parents][: SEARCH_UP + 1] if f not in folders]


def find_above(root: Path, *names: str | Path) -> Path | None:
    """The first file `names[i]` found in `root` or one of the SEARCH_UP folders above it."""
    for folder in folders_above(root):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def labelled_val_folder(folder: Path) -> bool:
    """True when `folder` holds ImageNet val images directly and the files that label them are beside or above."""
    return (
        bool(val_images(folder))
        and find_above(folder, KAGGLE_CSV, GROUND_TRUTH, Path(DEVKIT, "data", GROUND_TRUTH), DEVKIT_TAR) is not None
    )


def kaggle_val_below(folder: Path) -> Path | None:
    """Kaggle's val image folder when `folder` is Kaggle's top folder or one inside it on the way there
    (ILSVRC, Data: not CLS-LOC, whose val/ is told by `labelled_val_folder`)."""
    for start in range(len(KAGGLE_VAL.parts) - 2):
        below = folder.joinpath(*KAGGLE_VAL.parts[start:])
        if below.is_dir():
            return below
    return None


def _fail(path, reason: str, expected: str):
    raise DsqError(f"cannot read {path}: {reason}; expected {expected}") from None


def read_kaggle_csv(path: Path) -> dict[str, str]:
    """Image id ('ILSVRC2012_val_00000001') -> wnid, from Kaggle's LOC_val_solution.csv."""
    expected = "Kaggle's header ImageId,PredictionString and rows like ILSVRC2012_val_00000001,n01751748 ..."
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        _fail(path, " ".join(str(error).split()), expected)
    if not rows or [c.strip() for c in rows[0][:2]] != ["ImageId", "PredictionString"]:
        _fail(path, "no ImageId,PredictionString header", expected)
    wnids = {}
    for number, row in enumerate(rows[1:], 2):
        if len(row) < 2 or not row[1].split():
            _fail(path, f"line {number} names no wnid", expected)
        wnids[row[0].strip()] = row[1].split()[0]
    return wnids


def read_ground_truth(data: bytes, where) -> list[int]:
    """The devkit's ILSVRC2012_IDs, line i for ILSVRC2012_val_{i:08d}."""
    try:
        return [int(line) for line in data.decode("ascii").split()]
    except (UnicodeDecodeError, ValueError):
        _fail(where, "not a column of whole numbers", "one ILSVRC2012_ID per line, as in the devkit")


def read_meta_mat(data: bytes, where) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid of the 1000 leaf classes in the devkit's meta.mat `synsets` struct."""
    expected = "the devkit's meta.mat with its synsets struct (ILSVRC2012_ID, WNID, num_children)"
    try:
        synsets = loadmat(io.BytesIO(data), squeeze_me=True)["synsets"]
        rows = zip(synsets["ILSVRC2012_ID"], synsets["WNID"], synsets["num_children"])
        return {int(i): str(wnid) for i, wnid, children in rows if int(children) == 0}
    except (MatReadError, ValueError, KeyError, TypeError, IndexError, OSError) as error:
        _fail(where, " ".join(str(error).split()) or type(error).__name__, expected)


def read_meta_bin(path: Path) -> list[str]:
    """The wnids of torchvision's meta.bin ((wnid -> class names, val wnids), saved by torch.save)."""
    try:
        wnid_to_classes, _ = torch.load(path, map_location="cpu", weights_only=True)
        return [str(wnid) for wnid in dict(wnid_to_classes)]
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, OSError) as error:
        _fail(path, " ".join(str(error).split())[:200], "torchvision's meta.bin")


class Devkit:
    """The devkit's meta.mat and validation ground truth, from its folder or its tarball."""

    def __init__(self, ground_truth: bytes, meta_mat: bytes, truth_name: str, meta_name: str):
        self.ids = read_ground_truth(ground_truth, truth_name)
        self.id_to_wnid = read_meta_mat(meta_mat, meta_name)
        self.meta_name = meta_name
        self.where = f"{truth_name} and {meta_name}"

    @classmethod
    def find(cls, root: Path) -> Devkit | None:
        """The devkit beside `root` or above it: its data files, or ILSVRC2012_devkit_t12.tar.gz."""
        truth = find_above(root, GROUND_TRUTH, Path(DEVKIT, "data", GROUND_TRUTH))
        if truth is not None:
            meta = truth.with_name(META_MAT)
            if not meta.is_file():
                raise DsqError(
                    f"found {truth} but no {META_MAT} beside it: put the devkit's data/{META_MAT} there "
                    "(its class IDs are not the order models predict, so dsq needs it)"
                )
            return cls(truth.read_bytes(), meta.read_bytes(), str(truth), str(meta))
        tar = find_above(root, DEVKIT_TAR)
        return cls.from_tar(tar) if tar is not None else None

    @classmethod
    def from_tar(cls, path: Path) -> Devkit:
        try:
            with tarfile.open(path) as tar:
                read = lambda name: tar.extractfile(f"{DEVKIT}/data/{name}").read()  # noqa: E731
                return cls(read(GROUND_TRUTH), read(META_MAT), f"{path}:{GROUND_TRUTH}", f"{path}:{META_MAT}")
        except (tarfile.TarError, KeyError, AttributeError, OSError, EOFError) as error:
            expected = f"the devkit tarball with {DEVKIT}/data/{GROUND_TRUTH} and {META_MAT}"
            _fail(path, " ".join(str(error).split()), expected)

    def wnid(self, number: int) -> str:
        """The wnid of image ILSVRC2012_val_{number:08d}."""
        if not 1 <= number <= len(self.ids):
            raise DsqError(
                f"the ground truth in {self.where} has {len(self.ids)} lines, none for val image {number}: "
                "use the ground truth of these images"
            )
        wnid = self.id_to_wnid.get(self.ids[number - 1])
        if wnid is None:
            raise DsqError(
                f"val image {number} has class ID {self.ids[number - 1]}, which names no leaf class in "
                f"{self.where}: use the devkit's own meta.mat"
            )
        return wnid


def val_images(root: Path) -> dict[int, str]:
    """Number -> path of the ILSVRC2012_val_NNNNNNNN.JPEG files directly in `root`."""
    found = {}
    for name in sorted(os.listdir(root)):
        if m := VAL_IMAGE.fullmatch(name):
            found[int(m.group(1))] = str(root / name)
    return found


def _labelled(
    root: Path,
    items: list[tuple[str, str]],
    known: list[str],
    classes: ClassList | None,
    transform: Callable | None,
    layout: str,
    known_from: str,
) -> LabelledImages:
    """(path, wnid) items labelled by the wnid's index in `classes`, else in the sorted `known` wnids."""
    if classes is not None:
        given = classes if isinstance(classes, (str, os.PathLike)) else "the given list"
        names, order = read_classes(classes), f"classes from {given}"
    else:
        names, order = sorted(known), f"classes: the sorted wnids of {known_from}"
    label = {name: i for i, name in enumerate(names)}
    for path, wnid in items:
        if wnid not in label:
            raise DsqError(
                f"image {path} shows class {wnid}, which is not in the class list: pass the class list that names it"
            )
    samples = [(path, label[wnid]) for path, wnid in items]
    return LabelledImages(samples, names, transform, source=str(root), layout=f"{layout} ({order})")


def _check_all_val(root: Path, what: str) -> None:
    others = [n for n in os.listdir(root) if is_image_name(n) and not VAL_IMAGE.fullmatch(n)]
    if others:
        raise DsqError(
            f"{root} holds ImageNet val images labelled by {what}, but also {others[0]} "
            f"({len(others)} such images), which it does not label: move them elsewhere"
        )


def _kaggle(root: Path, numbered: dict[int, str], csv_path: Path, classes, transform) -> LabelledImages:
    _check_all_val(root, csv_path.name)
    wnids = read_kaggle_csv(csv_path)
    items = []
    for path in numbered.values():
        image_id = Path(path).stem
        if image_id not in wnids:
            raise DsqError(f"{csv_path} has no row for {image_id}: use the CSV that lists these images")
        items.append((path, wnids[image_id]))
    synsets = csv_path.with_name(KAGGLE_SYNSETS)
    if classes is None and not synsets.is_file():
        raise DsqError(
            f"{csv_path} names only the classes of its images, not all of them: pass --classes FILE with "
            "the model's classes in output order (for ImageNet-1k the 1000 sorted wnids), or put Kaggle's "
            f"{KAGGLE_SYNSETS} beside it"
        )
    known = read_classes(synsets) if classes is None else []
    return _labelled(
        root, items, known, classes, transform, f"ImageNet val, Kaggle layout, labels from {csv_path}", str(synsets)
    )


def _devkit(root: Path, numbered: dict[int, str], devkit: Devkit, classes, transform) -> LabelledImages:
    _check_all_val(root, GROUND_TRUTH)
    items = [(path, devkit.wnid(number)) for number, path in numbered.items()]
    return _labelled(
        root,
        items,
        list(devkit.id_to_wnid.values()),
        classes,
        transform,
        f"ImageNet val, devkit layout, labels from {devkit.where}",
        devkit.meta_name,
    )


def _torchvision_root(root: Path, classes, transform) -> LabelledImages | None:
    meta, tar = root / META_BIN, root / DEVKIT_TAR
    if not (meta.is_file() or tar.is_file()):
        return None
    val = root / "val"
    wnids = subfolders(val)
    if not wnids and val_images(val):
        raise DsqError(
            f"{val} holds the ImageNet val images directly, not in <wnid> folders: did you mean --data {val}?"
        )
    if meta.is_file():
        known, known_from = read_meta_bin(meta), str(meta)
    else:
        devkit = Devkit.from_tar(tar)
        known, known_from = list(devkit.id_to_wnid.values()), devkit.meta_name
    items = [(path, wnid) for wnid, paths in zip(wnids, images_in_folders(val, wnids)) for path in paths]
    if not items:
        raise DsqError(
            f"found 0 images in {val}: torchvision's ImageNet root holds val/<wnid>/*.JPEG "
            "(extract ILSVRC2012_img_val.tar there as torchvision.datasets.ImageNet does)"
        )
    return _labelled(root, items, known, classes, transform, "torchvision ImageNet root", known_from)


def open_imagenet(
    root: Path, transform: Callable | None = None, classes: ClassList | None = None
) -> LabelledImages | None:
    """ImageNet val at `root` in one of its published layouts, or None when it is in none of them.

    A torchvision root (meta.bin or the devkit tarball, and val/<wnid>/); Kaggle's top folder or
    its ILSVRC/Data/CLS-LOC/val with LOC_val_solution.csv above; a flat folder of
    ILSVRC2012_val_*.JPEG with LOC_val_solution.csv or the devkit's ground truth and meta.mat
    beside it or up to SEARCH_UP folders above.
    """
    if (root / "val").is_dir():
        found = _torchvision_root(root, classes, transform)
        if found is not None:
            return found
    if (root / KAGGLE_VAL).is_dir() and (root / KAGGLE_CSV).is_file():
        root = root / KAGGLE_VAL
    numbered = val_images(root)
    if not numbered:
        return None
    csv_path = find_above(root, KAGGLE_CSV)
    if csv_path is not None:
        return _kaggle(root, numbered, csv_path, classes, transform)
    devkit = Devkit.find(root)
    return _devkit(root, numbered, devkit, classes, transform) if devkit is not None else None
