"""Images for calibration and evaluation: preprocessing presets and labelled image datasets."""

from .checks import check_labels
from .classes import CIFAR10_CLASSES, is_wnid, read_classes
from .flat import WnidFileDataset
from .folders import ClassFolderDataset
from .images import IMAGE_EXTENSIONS, LabelledImages, load_image
from .presets import PRESETS, Preset, get_preset
from .samples import DEMO_SETS, demo_dataset, demo_folder, open_dataset

__all__ = [
    "CIFAR10_CLASSES",
    "DEMO_SETS",
    "IMAGE_EXTENSIONS",
    "PRESETS",
    "ClassFolderDataset",
    "LabelledImages",
    "Preset",
    "WnidFileDataset",
    "check_labels",
    "demo_dataset",
    "demo_folder",
    "get_preset",
    "is_wnid",
    "load_image",
    "open_dataset",
    "read_classes",
]
