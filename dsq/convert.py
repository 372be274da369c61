"""Model surgery: copy a float model and swap its convs for DSConv layers, with a report."""
from __future__ import annotations

import copy
import fnmatch
import math
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .errors import DsqError
from .formats import DEFAULT_ROUNDS, DEFAULT_SUM_WEIGHT, ActFormat, WeightFormat, packed_size
from .nn import layer_kind, set_backend, to_dsconv

# How KDS scales are stored. The model in memory already uses the rounded scales, so a saved
# file reloads bit-identical. float16 is the default: over the 16 points of a ResNet-20 sweep on
# all 10 000 CIFAR-10 test images (bits 2-8, blocks 8-64) it moved top-1 by -0.14 to +0.18
# points, +0.001 on average, against float32 (docs/file-format.md, "Scale precision").
SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
DEFAULT_SCALE_DTYPE = "float16"
# Depthwise convs hold few weights but carry much of a MobileNet/EfficientNet's error at
# 4 bits (spec, anchors): they stay at 8 bits unless asked otherwise; the report shows it.
DEFAULT_DEPTHWISE_BITS = 8


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

    weight_format: WeightFormat
    act_format: ActFormat | None
    settings: dict = field(default_factory=dict)  # the arguments of `quantize`, to redo it
    layers: list[LayerReport] = field(default_factory=list)
    model_float_bytes: int = 0
    model_quantized_bytes: int = 0
    seconds: float = 0.0
    calibration: dict | None = None  # dsq.calibration.CalibrationReport.to_dict(), when calibrated

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
            "settings": self.settings,
            "model_float_bytes": self.model_float_bytes,
            "model_quantized_bytes": self.model_quantized_bytes,
            "compression": self.compression,
            "mean_bits_per_weight": self.mean_bits_per_weight,
            "seconds": self.seconds,
            "calibration": self.calibration,
            "layers": [asdict(r) for r in self.layers],
        }


def _matches(name: str, patterns) -> str | None:
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise): infinite without noise."""
    return 10 * math.log10(signal / noise) if noise else math.inf


def weight_error(w: torch.Tensor, wq: torch.Tensor) -> tuple[float, float]:
    """Weight SQNR in dB and relative L2 error."""
    signal = w.double().pow(2).sum().item()
    noise = (w.double() - wq.double()).pow(2).sum().item()
    rel = math.sqrt(noise / signal) if signal else 0.0
    return sqnr_db(signal, noise), rel


def state_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, as the model holds them."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def scale_torch_dtype(scale_dtype: str) -> torch.dtype:
    """The torch dtype that the name `scale_dtype` stands for; DsqError when unknown."""
    if scale_dtype not in SCALE_DTYPES:
        raise DsqError(f"unknown scale dtype {scale_dtype!r}: use one of {', '.join(SCALE_DTYPES)}")
    return SCALE_DTYPES[scale_dtype]


def scale_bits(scale_dtype: str) -> int:
    """Bits of one stored KDS value: 16 or 32."""
    return scale_torch_dtype(scale_dtype).itemsize * 8


def packed_weight_bytes(params: int, n_scales: int, bits: int, scale_dtype: str) -> int:
    """Bytes of b-bit packed integers plus scales stored as `scale_dtype`."""
    return packed_size(params, bits) + n_scales * scale_bits(scale_dtype) // 8


def quantize(
    model: nn.Module,
    bits: int = 4,
    block: int = 32,
    method: str = "l2",
    *,
    rounds: int = DEFAULT_ROUNDS,
    sum_weight: float = DEFAULT_SUM_WEIGHT,
    layout: str = "auto",
    act_bits: int | None = 8,
    act_block: int | None = None,
    include: tuple[str, ...] = ("*",),
    exclude: tuple[str, ...] = (),
    layer_bits: dict[str, int] | None = None,
    depthwise_bits: int | None = DEFAULT_DEPTHWISE_BITS,
    quantize_linear: bool = False,
    quantize_image_input: bool = False,
    scale_dtype: str = DEFAULT_SCALE_DTYPE,
    backend: str = "simulate",
    progress: bool = False,
) -> tuple[nn.Module, QuantReport]:
    """Return a DSConv copy of `model` and a per-layer report; `model` is left untouched.

    Every nn.Conv2d (and subclass) whose name matches an `include` glob and no `exclude`
    glob becomes a DSConv layer with `bits`-bit VQK (or the bits of the first `layer_bits`
    glob that matches its name; depthwise convs get `depthwise_bits`, None: `bits`) and one
    KDS per `block` slice (L2 fit with `rounds` refinements and the slice-sum error weighted
    by `sum_weight`); linear
    layers stay float unless `quantize_linear`. Conv inputs are rounded to BFP with
    `act_bits`-bit mantissas over `act_block` channels (default: `block`; None: float
    inputs), except the first conv's input (the image) unless `quantize_image_input`.
    KDS scales are rounded to `scale_dtype` ("float16" or "float32"), the precision a saved
    file keeps them in. The copy computes with `backend` (see dsq.nn.set_backend).
    """
    started = time.perf_counter()
    include, exclude = _globs(include), _globs(exclude)
    settings = dict(bits=bits, block=block, method=method, rounds=rounds, sum_weight=sum_weight, layout=layout,
                    act_bits=act_bits,
                    act_block=act_block, include=list(include), exclude=list(exclude),
                    layer_bits=dict(layer_bits or {}), depthwise_bits=depthwise_bits,
                    quantize_linear=quantize_linear, quantize_image_input=quantize_image_input,
                    scale_dtype=scale_dtype)
    stored_dtype = scale_torch_dtype(scale_dtype)
    fmt = WeightFormat(bits, block, method, rounds, layout, sum_weight)
    act = ActFormat(act_bits, block if act_block is None else act_block) if act_bits is not None else None
    overrides = {glob: replace(fmt, bits=b) for glob, b in settings["layer_bits"].items()}
    qmodel = copy.deepcopy(model).eval()
    report = QuantReport(fmt, act, settings, model_float_bytes=state_bytes(model))
    targets = [(n, m) for n, m in qmodel.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    first_conv = next((n for n, m in targets if isinstance(m, nn.Conv2d)), None)
    saved = 0
    for name, module in tqdm(targets, desc="quantizing", unit="layer", disable=not progress):
        row = _describe(name, module)
        reason = _keep_float_reason(name, module, include, exclude, quantize_linear)
        if reason:
            row.note = reason
        else:
            w = module.weight.detach().clone()
            layer_act = act if (name != first_conv or quantize_image_input) else None
            layer_fmt, row.note = _layer_format(name, row.kind, fmt, overrides, depthwise_bits)
            to_dsconv(module, layer_fmt, layer_act)
            _round_scales(name, module, stored_dtype)
            _fill_quantized(row, module, w, layer_fmt, layer_act, scale_dtype, image_input=name == first_conv)
            saved += row.float_bytes - row.packed_bytes
        report.layers.append(row)
    report.model_quantized_bytes = report.model_float_bytes - saved
    if backend != "simulate":
        set_backend(qmodel, backend)
    report.seconds = time.perf_counter() - started
    return qmodel, report


def _globs(patterns) -> tuple[str, ...]:
    return (patterns,) if isinstance(patterns, str) else tuple(patterns)


def _layer_format(name, kind, fmt, overrides, depthwise_bits) -> tuple[WeightFormat, str]:
    """The format of one layer and the note that explains a deviation from `fmt`."""
    pattern = _matches(name, overrides)
    if pattern:
        return overrides[pattern], f"{overrides[pattern].bits} bits by pattern {pattern!r}"
    if kind == "depthwise" and depthwise_bits is not None and depthwise_bits != fmt.bits:
        return replace(fmt, bits=depthwise_bits), f"depthwise: {depthwise_bits} bits (depthwise_bits)"
    return fmt, ""


def _describe(name: str, module: nn.Module) -> LayerReport:
    w = module.weight
    return LayerReport(
        name=name, kind=layer_kind(module), shape=list(w.shape), groups=getattr(module, "groups", 1),
        params=w.numel(), quantized=False, float_bytes=w.numel() * w.element_size(),
        packed_bytes=w.numel() * w.element_size(),
    )


def _keep_float_reason(name, module, include, exclude, quantize_linear) -> str:
    if isinstance(module, nn.Linear) and not quantize_linear:
        return "linear layer kept float (quantize_linear=True quantizes it)"
    pattern = _matches(name, exclude)
    if pattern:
        return f"excluded by pattern {pattern!r}"
    if not _matches(name, include):
        return "matches no include pattern"
    return ""


def _round_scales(name: str, module: nn.Module, dtype: torch.dtype) -> None:
    """Round the layer's KDS to `dtype` in place (kept float32 in memory)."""
    stored = module.kds.to(dtype)
    if not bool(torch.isfinite(stored).all()):
        raise DsqError(f"layer {name}: a weight scale exceeds the {str(dtype).removeprefix('torch.')} range; "
                       "use scale dtype float32")
    module.kds.copy_(stored)


def _fill_quantized(row, module, w, fmt, act, scale_dtype, image_input) -> None:
    row.quantized = True
    row.bits, row.block, row.layout = fmt.bits, fmt.block, module.layout.kind
    row.act = act.label if act else ("float (image input)" if image_input else "float")
    n_scales = module.kds.numel()
    row.packed_bytes = packed_weight_bytes(row.params, n_scales, fmt.bits, scale_dtype)
    row.bits_per_weight = fmt.bits + scale_bits(scale_dtype) * n_scales / row.params
    row.sqnr_db, row.rel_error = weight_error(w, module.weight.detach())
