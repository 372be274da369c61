"""The main job as one library call: load, quantize, evaluate before and after, report."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ._version import __version__
from .calibration import DEFAULT_CALIB_IMAGES, calibrate, calibration_set
from .config import CalibConfig, QuantConfig
from .convert import QuantReport, quantize
from .data import check_labels
from .evaluate import Accuracy, evaluate
from .models import LoadedModel

if TYPE_CHECKING:
    from .bit_budget import BitBudget


@dataclass
class QuantizeRun:
    """Everything one `dsq quantize` produced, ready for tables and JSON."""

    loaded: LoadedModel
    qmodel: nn.Module
    report: QuantReport
    accuracy: dict[str, Accuracy] = field(default_factory=dict)
    data: str | None = None
    seconds: float = 0.0
    budget: BitBudget | None = None  # the per-layer bits chosen for a target, when one was given

    @property
    def drop(self) -> dict[str, float] | None:
        if not self.accuracy:
            return None
        f, q = self.accuracy["float"], self.accuracy["quantized"]
        return {"top1": f.top1 - q.top1, "top5": f.top5 - q.top5}  # points lost: positive is worse

    def accuracy_dict(self) -> dict | None:
        if not self.accuracy:
            return None
        return {**{k: v.to_dict() for k, v in self.accuracy.items()}, "drop": self.drop}

    def to_dict(self) -> dict:
        return {
            "model": {
                "source": self.loaded.source,
                "arch": self.loaded.arch,
                "preset": self.loaded.preset,
                "num_classes": self.loaded.num_classes,
                "known_top1": self.loaded.known_top1,
            },
            "quantization": self.report.to_dict(),
            "data": self.data,
            "accuracy": self.accuracy_dict(),
            "bit_budget": self.budget.to_dict() if self.budget else None,
            "versions": versions(),
            "wall_seconds": self.seconds,
        }


def versions() -> dict:
    return {"dsq": __version__, "torch": torch.__version__, "python": platform.python_version()}


def quantize_and_evaluate(
    loaded: LoadedModel,
    config: QuantConfig,
    dataset=None,
    *,
    eval_options: dict | None = None,
    progress: bool = True,
    calib: str | None = None,
    calib_images: int = DEFAULT_CALIB_IMAGES,
    calib_config: CalibConfig | None = None,
    transform=None,
    backend: str = "simulate",
    target_bits: float | None = None,
) -> QuantizeRun:
    """Quantize `loaded.model` as `config` says, computing with `backend`; with `calib` (a folder
    of images, read through `transform`), calibrate it on `calib_images` of them (`dsq.calibrate`
    with `calib_config`); with a dataset, evaluate float and quantized on the same images, those
    used to calibrate left out. With `target_bits`, each layer's bits are chosen first
    (`dsq.bit_budget`), measured on the calibration images, else on the dataset's."""
    started = time.perf_counter()
    images = None
    if calib is not None:  # before quantizing: a bad folder fails first
        images, dataset = calibration_set(calib, calib_images, transform, dataset, progress=progress)
    budget = None
    if target_bits is not None:
        from .bit_budget import bit_budget, budget_images  # it imports dsq.resume, which imports this module

        probe = budget_images(images, dataset)
        refit = images is not None and (calib_config or CalibConfig()).refit  # costs as calibration starts them
        budget = bit_budget(loaded.model, config, probe, target_bits, refit=refit, progress=progress)
        config = budget.config
    qmodel, report = quantize(loaded.model, config, backend=backend, progress=progress)
    run = QuantizeRun(loaded, qmodel, report, budget=budget)
    if calib is not None:
        calibrate(loaded.model, qmodel, report, images, calib_config, source=str(calib), progress=progress)
    if dataset is not None:
        check_labels(dataset, loaded.num_classes)
        run.accuracy = evaluate(
            {"float": loaded.model, "quantized": qmodel}, dataset, progress=progress, **(eval_options or {})
        )
        run.data = dataset.describe()
    run.seconds = time.perf_counter() - started
    return run
