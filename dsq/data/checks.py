"""Checks that a dataset's labels fit a model's outputs."""

from __future__ import annotations

from ..errors import DsqError


def check_labels(dataset, num_classes: int) -> None:
    """DsqError unless the dataset's labels name the model's `num_classes` outputs.

    Reads `dataset.targets` or `dataset.samples` ((path, label) pairs), so no image is decoded.
    When the dataset has `classes`, their count must equal `num_classes` too: otherwise its labels
    do not name the model's outputs (e.g. 10 class folders for a 1000-class model).
    """
    if hasattr(dataset, "targets"):
        labels = [int(label) for label in dataset.targets]
    else:
        labels = [label for _, label in dataset.samples]
    top = max(labels, default=-1)
    classes = len(dataset.classes) if hasattr(dataset, "classes") else None
    if top >= num_classes or (classes is not None and classes != num_classes):
        what = f"labels up to {top}" if classes is None or top >= classes else f"{classes} classes"
        name = getattr(dataset, "source", type(dataset).__name__)
        raise DsqError(
            f"{name} has {what} but the model predicts {num_classes}: use images labelled for this model, "
            f"or --classes FILE listing the model's {num_classes} classes in output order"
        )
