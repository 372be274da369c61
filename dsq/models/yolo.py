"""ultralytics YOLO with DSConv layers (docs/yolo.md): offline set-up, quantizing a detector's
every conv in place, dsq's small ONNX export of it, and ultralytics' own trainer on its DSConv layers.

Importing this module sets YOLO_OFFLINE=1 and YOLO_AUTOINSTALL=0 (unless already set) before it
imports ultralytics: no update checks, no analytics, no pip installs (and ultralytics' import does
not leave OMP_NUM_THREADS=1 behind: `ultralytics_module`). Where ultralytics would
download (weights named but not on disk, a dataset yaml whose images are missing), dsq stops with
a DsqError instead. BatchNorm folding needs nothing here: ultralytics' `fuse()` folds into a DSConv
layer as into a conv (DSConvMixin.__setattr__).
"""

from __future__ import annotations

import copy
import importlib
import os
from pathlib import Path

import torch
from torch import nn

from ..convert import quantize
from ..errors import DsqError
from ..nn import freeze, make_trainable
from ..quant_report import QuantReport

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "0")


def ultralytics_module(name: str = "ultralytics"):
    """The module `name` of ultralytics; DsqError when ultralytics is not installed. Where no
    OMP_NUM_THREADS was set, ultralytics' import sets it to 1, which would run every later child
    process (dsq's own commands included) on one thread: it is taken out again."""
    unset = "OMP_NUM_THREADS" not in os.environ
    try:
        return importlib.import_module(name)
    except ImportError:
        raise DsqError("YOLO models need the optional package ultralytics: pip install 'dsq[yolo]'") from None
    finally:
        if unset:
            os.environ.pop("OMP_NUM_THREADS", None)


def load_yolo(model: str | os.PathLike = "yolov8n.yaml"):
    """An ultralytics YOLO from a model yaml (ultralytics' own, e.g. yolov8n.yaml: initial weights) or
    a local .pt file; DsqError for anything else, which ultralytics would try to download."""
    ultralytics = ultralytics_module()
    path = Path(model)
    if path.suffix not in (".yaml", ".yml") and not path.is_file():
        raise DsqError(
            f"{model} is not a local file and ultralytics would download it: pass a model yaml "
            "(e.g. yolov8n.yaml) or a .pt file on disk"
        )
    return ultralytics.YOLO(str(model))


def quantize_yolo(yolo, config=None, *, fuse: bool = True, **options) -> QuantReport:
    """Quantize `yolo.model` (every Conv2d of backbone, neck and head, as dsq.quantize's config says)
    and put the DSConv model in its place; `yolo.predict`, `val`, `export` and `save` then run it.

    `fuse` folds BatchNorm into the float convs first, as predict, val and export would: the model
    dsq reports is then the one they run. `fuse=False` keeps BatchNorm (to train it); their `fuse()`
    later folds it into the DSConv scales, rounding each scale once more to its scale dtype.
    """
    model = copy.deepcopy(yolo.model).fuse(verbose=False) if fuse else yolo.model
    qmodel, report = quantize(model, config, **options)
    yolo.model, yolo.predictor = qmodel, None
    return report


def check_dataset(data: str | os.PathLike) -> Path:
    """The dataset yaml `data`, once every image folder or list it names is on disk; DsqError
    otherwise (ultralytics would try to download the dataset)."""
    yaml = ultralytics_module("ultralytics.utils").YAML
    path = Path(data)
    if not path.is_file():
        raise DsqError(f"dataset {data} is not a yaml file on disk, so ultralytics would download it: write one")
    spec = yaml.load(path)
    root = Path(spec.get("path") or path.parent)
    root = root if root.is_absolute() else path.parent / root
    for split in ("train", "val"):
        for entry in [spec.get(split)] if isinstance(spec.get(split), str) else spec.get(split) or []:
            if not (root / entry).exists():
                raise DsqError(
                    f"dataset {data}: its {split} images {root / entry} are missing, so ultralytics would "
                    "download them: point the yaml at images on disk"
                )
    return path


def export_onnx(yolo, path: str | os.PathLike, imgsz: int = 640) -> int:
    """Write dsq's ONNX file of quantized `yolo` (INT4/INT8 DequantizeLinear weights, dsq.BFP inputs;
    docs/export.md) with BatchNorm folded and the Detect head in ultralytics' export form (one output
    (N, 4 + classes, anchors)); returns the bytes written."""
    from ..exporters import export

    detect = ultralytics_module("ultralytics.nn.modules").Detect

    model = copy.deepcopy(yolo.model).float().eval().fuse(verbose=False)
    for m in model.modules():
        if isinstance(m, detect):
            m.export, m.format = True, "onnx"
    return export(model, path, torch.zeros(1, 3, imgsz, imgsz))


def trainer_for(model: nn.Module):
    """An ultralytics DetectionTrainer class that trains `model` (trainable DSConv layers,
    dsq.nn.make_trainable) instead of the float model it would build from the yaml."""
    trainer = ultralytics_module("ultralytics.models.yolo.detect").DetectionTrainer

    class DSConvTrainer(trainer):
        def get_model(self, cfg=None, weights=None, verbose=True):
            return model

    return DSConvTrainer


def train_yolo(yolo, data: str | os.PathLike, weights: str = "ste", **kwargs):
    """Train quantized `yolo` with ultralytics' own trainer on the dataset yaml `data`, its DSConv
    layers trainable (dsq.nn.make_trainable with `weights`), then freeze them; kwargs go to
    `yolo.train` (plots default to off: no fonts to fetch). Returns ultralytics' metrics; torch's
    thread count is left as it was."""
    check_dataset(data)
    make_trainable(yolo.model, weights)
    threads = torch.get_num_threads()  # ultralytics sets the CPU's cores less one (select_device)
    try:
        metrics = yolo.train(trainer=trainer_for(yolo.model), data=str(data), **{"plots": False, **kwargs})
    finally:
        torch.set_num_threads(threads)
    freeze(yolo.model)  # ultralytics reloaded its best checkpoint into yolo.model: still trainable
    return metrics
