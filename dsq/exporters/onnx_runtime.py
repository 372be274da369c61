"""Running an exported ONNX file in onnxruntime as if it were a torch model, for `dsq eval`."""

from __future__ import annotations

import json
import os

import onnxruntime as ort
import torch
import torch.nn as nn

from ..errors import DsqError
from .onnx_export import METADATA_PREFIX

# onnxruntime keeps every DequantizeLinear for its int8 QDQ fusions and so dequantizes the weights at
# every run (ResNet-50 weights only: 0.66x of float's images per second, benchmarks/onnx_speed.py).
# With this entry it folds them into float weights once, at load.
FOLD_WEIGHTS = ("session.disable_quant_qdq", "1")
# ... and would then fold BatchNorm into those weights, which rounds differently from dsq's BatchNorm
# after the conv: on all 10 000 CIFAR-10 test images ResNet-20 W4 A8 then agreed with dsq on 99.87 % of
# predictions, 99.93 % without these fusions (docs/export.md).
KEEP_BATCHNORM = ["ConvBNFusion", "ConvAddFusion", "ConvMulFusion"]


def session(path: str | os.PathLike, threads: int = 0, keep_batchnorm: bool = True) -> ort.InferenceSession:
    """An onnxruntime CPU session for a dsq export: weights folded at load, BatchNorm kept apart
    (or folded into the weights, faster and further from dsq's numbers)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0: onnxruntime's choice, one per core
    options.add_session_config_entry(*FOLD_WEIGHTS)
    disabled = KEEP_BATCHNORM if keep_batchnorm else []
    return ort.InferenceSession(
        os.fspath(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled
    )


class OnnxModel(nn.Module):
    """An onnxruntime session behind nn.Module's call: float32 (N, C, H, W) in, the first
    output (logits) out, on the CPU, with every optimisation onnxruntime has."""

    def __init__(self, path: str | os.PathLike, threads: int = 0):
        super().__init__()
        try:
            self.session = session(path, threads)
        except Exception as error:  # onnxruntime raises its own kinds for unreadable, invalid or unsupported files
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise DsqError(f"onnxruntime cannot load {path}: {first[:300]}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.metadata = _dsq_metadata(path, self.session.get_modelmeta().custom_metadata_map)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (logits, *_) = self.session.run(None, {self.input_name: x.detach().float().cpu().contiguous().numpy()})
        return torch.from_numpy(logits)


def _dsq_metadata(path, props: dict[str, str]) -> dict:
    """The `dsq.*` metadata that dsq.export wrote (JSON values), by name without the prefix."""
    metadata = {}
    for key, value in props.items():
        if key.startswith(METADATA_PREFIX):
            try:
                metadata[key.removeprefix(METADATA_PREFIX)] = json.loads(value)
            except ValueError:
                raise DsqError(f"{path}: its metadata {key!r} is not JSON; export the model again") from None
    return metadata
