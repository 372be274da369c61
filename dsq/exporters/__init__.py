"""Quantized models for other runtimes (docs/export.md): ONNX files that onnxruntime runs
(blocked DequantizeLinear weights and a dsq.BFP function for the activations), and plain torch
state_dicts of the dequantized weights. The ONNX part needs the optional extra `dsq[onnx]`."""

from __future__ import annotations

import os
from importlib import import_module
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import DsqError
from .state_dict import dequantized_state_dict, save_state_dict

FORMATS = ("onnx", "pth")
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")

__all__ = ["FORMATS", "dequantized_state_dict", "export", "format_of", "load_onnx", "require_onnx"]


def require_onnx() -> None:
    """DsqError, one line saying how to install them, unless onnx, onnxscript and onnxruntime import."""
    for package in ONNX_PACKAGES:
        try:
            import_module(package)
        except ImportError:
            raise DsqError(
                f"ONNX export and evaluation need the packages {', '.join(ONNX_PACKAGES)} ({package} is "
                "missing): pip install 'dsq[onnx]'"
            ) from None


def format_of(path: str | os.PathLike) -> str:
    """ "onnx" or "pth", as the file name's suffix says; DsqError for any other."""
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".pth", ".pt"):
        return "pth"
    raise DsqError(f"cannot tell the export format of {path}: name it .onnx or .pth, or give the format")


def export(
    qmodel: nn.Module,
    path: str | os.PathLike,
    example_input: torch.Tensor | None = None,
    *,
    format: str | None = None,
    weights_only: bool = False,
    metadata: dict | None = None,
) -> int:
    """Write quantized `qmodel` to `path` for another runtime; returns the bytes written.

    Args:
        qmodel: a model from dsq.quantize or dsq.load (frozen, if it was trained).
        path: the file to write, atomically (nothing is left behind on failure).
        example_input: ONNX only: a float32 batch (N, C, H, W) to trace the model with; the
            exported batch axis is dynamic.
        format: "onnx" (opset 21: blocked DequantizeLinear, INT4/INT8 codes, a dsq.BFP function
            per BFP input) or "pth" (a state_dict of the dequantized weights for the float
            architecture); None: from the suffix of `path`.
        weights_only: ONNX only: leave out the BFP rounding of activations.
        metadata: ONNX only: JSON values stored as `dsq.<key>` metadata (dsq eval reads
            `preset` and `num_classes`).

    Returns:
        The size of the written file in bytes. DsqError for a model without DSConv layers or a
        trainable one, a missing example input or ONNX packages, or a failed write.

    Example:
        >>> import os, tempfile, torch, torch.nn as nn, dsq
        >>> qmodel, _ = dsq.quantize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1)), bits=4)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = os.path.join(folder, "model.pth")
        ...     size = dsq.export(qmodel, path)
        ...     sorted(torch.load(path, weights_only=True))
        ['0.bias', '0.weight', '2.bias', '2.weight']
    """
    format = format or format_of(path)
    if format not in FORMATS:
        raise DsqError(f"unknown export format {format!r}: use one of {', '.join(FORMATS)}")
    if format == "pth":
        save_state_dict(qmodel, path)
    else:
        require_onnx()
        from .onnx_export import save_onnx, to_onnx

        save_onnx(to_onnx(qmodel, example_input, weights_only=weights_only, metadata=metadata), path)
    return os.path.getsize(path)


def load_onnx(path: str | os.PathLike) -> nn.Module:
    """An exported ONNX file as a torch-callable model run by onnxruntime (`.metadata`: what
    dsq.export stored)."""
    require_onnx()
    from .onnx_runtime import OnnxModel

    return OnnxModel(path)
