"""The per-layer report of a quantization run, each row derived from the float layer and its DSConv layer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from .config import QuantConfig
from .formats import ActFormat, WeightFormat, packed_size, scale_bits
from .metrics import weight_error
from .nn import is_dsconv, layer_kind

IMAGE_INPUT_ACT = "float (image input)"  # the act column of the conv that reads the image, kept float


@dataclass
class LayerReport:
    """How one conv or linear layer was treated, and what it costs."""

    name: str
    kind: str
    shape: list[int]
    groups: int
    params: int
    quantized: bool
    bits: int | None = None
    block: int | None = None
    layout: str | None = None
    act: str = "float"
    bits_per_weight: float = 32.0
    sqnr_db: float | None = None
    rel_error: float | None = None
    float_bytes: int = 0
    packed_bytes: int = 0
    note: str = ""
    out_sqnr_before_db: float | None = None  # output SQNR on calibration images, before/after calibration
    out_sqnr_after_db: float | None = None


@dataclass
class QuantReport:
    """Per-layer results and whole-model sizes of one quantization run."""

    config: QuantConfig  # the recipe, to redo the run
    layers: list[LayerReport] = field(default_factory=list)
    model_float_bytes: int = 0
    model_quantized_bytes: int = 0
    seconds: float = 0.0
    calibration: dict | None = None  # dsq.calibration.CalibrationReport.to_dict(), when calibrated
    warnings: list[str] = field(default_factory=list)  # one line each: what the user likely did not mean

    @property
    def weight_format(self) -> WeightFormat:
        return self.config.weight

    @property
    def act_format(self) -> ActFormat | None:
        return self.config.act

    @property
    def quantized_layers(self) -> list[LayerReport]:
        return [r for r in self.layers if r.quantized]

    @property
    def float_layers(self) -> list[LayerReport]:
        return [r for r in self.layers if not r.quantized]

    @property
    def compression(self) -> float:
        return self.model_float_bytes / max(self.model_quantized_bytes, 1)

    @property
    def mean_bits_per_weight(self) -> float:
        """Average bits per quantized weight, scales included."""
        q = self.quantized_layers
        n = sum(r.params for r in q)
        return sum(r.bits_per_weight * r.params for r in q) / n if n else 32.0

    def to_dict(self) -> dict:
        return {
            "weight_format": asdict(self.weight_format),
            "act_format": asdict(self.act_format) if self.act_format else None,
            "settings": self.config.to_dict(),
            "model_float_bytes": self.model_float_bytes,
            "model_quantized_bytes": self.model_quantized_bytes,
            "compression": self.compression,
            "mean_bits_per_weight": self.mean_bits_per_weight,
            "seconds": self.seconds,
            "calibration": self.calibration,
            "warnings": self.warnings,
            "layers": [asdict(r) for r in self.layers],
        }


def packed_weight_bytes(params: int, n_scales: int, bits: int, scale_dtype: str) -> int:
    """Bytes of b-bit packed integers plus scales stored as `scale_dtype`."""
    return packed_size(params, bits) + n_scales * scale_bits(scale_dtype) // 8


def layer_row(
    name: str, float_weight: torch.Tensor, layer: nn.Module, *, note: str = "", image_input: bool = False
) -> LayerReport:
    """The row of layer `name`: what it is, and, when `layer` is a DSConv layer, its formats, size
    and weight error against `float_weight` (the float layer's weight); `image_input`: it reads the image."""
    size = float_weight.numel() * float_weight.element_size()
    row = LayerReport(
        name=name,
        kind=layer_kind(layer),
        shape=list(float_weight.shape),
        groups=getattr(layer, "groups", 1),
        params=float_weight.numel(),
        quantized=False,
        float_bytes=size,
        packed_bytes=size,
        note=note,
    )
    if not is_dsconv(layer):
        return row
    fmt, act, n_scales = layer.weight_format, layer.act_format, layer.kds.numel()
    row.quantized = True
    row.bits, row.block, row.layout = fmt.bits, fmt.block, layer.layout.kind
    row.act = act.label if act else (IMAGE_INPUT_ACT if image_input else "float")
    row.packed_bytes = packed_weight_bytes(row.params, n_scales, fmt.bits, fmt.scale_dtype)
    row.bits_per_weight = fmt.bits + scale_bits(fmt.scale_dtype) * n_scales / row.params
    row.sqnr_db, row.rel_error = weight_error(float_weight, layer.weight.detach())
    return row
