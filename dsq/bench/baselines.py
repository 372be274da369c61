"""The baselines' models: torch's x86 int8 model, the float model as an ONNX file, and onnxruntime's
int8 model of that file."""

from __future__ import annotations

import contextlib
import copy
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import DsqError
from ..exporters import require_onnx


@contextlib.contextmanager
def quantized_engine(name: str):
    """torch's quantized engine set to `name` for the block (it packs int8 weights for it)."""
    if name not in torch.backends.quantized.supported_engines:
        raise DsqError(f"torch has no {name} quantized engine on this machine")
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def torch_int8(model: nn.Module, calibration: torch.Tensor) -> nn.Module:
    """torch's x86 int8 model of `model`: FX graph mode static post-training quantization with
    the x86 qconfig mapping (per-channel int8 weights), activations calibrated on `calibration`."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with quantized_engine("x86"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (calibration,))
        with torch.inference_mode():
            prepared(calibration)
        return convert_fx(prepared)


def export_float_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """`model` as an ONNX file (torch.onnx's dynamo exporter; the batch axis dynamic)."""
    require_onnx()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), dynamo=True, dynamic_shapes=({0: torch.export.Dim.AUTO},), verbose=False
        )
    return path


class CalibrationImages:
    """onnxruntime's CalibrationDataReader (duck-typed: get_next) over one batch of images."""

    def __init__(self, input_name: str, images: torch.Tensor):
        self.feeds = iter([{input_name: images.numpy()}])

    def get_next(self) -> dict | None:
        return next(self.feeds, None)


def onnx_int8(float_path: Path, calibration: torch.Tensor, path: Path) -> Path:
    """onnxruntime's static int8 QDQ model of a float ONNX file (quantize_static: per-channel
    weights, otherwise its defaults) after its recommended pre-processing, activations calibrated
    on `calibration`."""
    import onnx
    from onnxruntime.quantization import QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = path.with_suffix(".prepared.onnx")
    quant_pre_process(str(float_path), str(prepared))
    input_name = onnx.load(prepared, load_external_data=False).graph.input[0].name
    images = CalibrationImages(input_name, calibration)
    quantize_static(str(prepared), str(path), images, quant_format=QuantFormat.QDQ, per_channel=True)
    return path
