"""Model surgery: copy a float model and swap its convs for DSConv layers, with a report."""
from __future__ import annotations

import copy
import fnmatch
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .formats import DEFAULT_ROUNDS, ActFormat, WeightFormat
from .nn import layer_kind, to_dsconv

SCALE_BITS = 32  # KDS values are kept as float32


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


@dataclass
class QuantReport:
    """Per-layer results and whole-model sizes of one quantization run."""

    weight_format: WeightFormat
    act_format: ActFormat | None
    layers: list[LayerReport] = field(default_factory=list)
    model_float_bytes: int = 0
    model_quantized_bytes: int = 0
    seconds: float = 0.0

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
            "model_float_bytes": self.model_float_bytes,
            "model_quantized_bytes": self.model_quantized_bytes,
            "compression": self.compression,
            "mean_bits_per_weight": self.mean_bits_per_weight,
            "seconds": self.seconds,
            "layers": [asdict(r) for r in self.layers],
        }


def _matches(name: str, patterns) -> str | None:
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


def _weight_error(w: torch.Tensor, wq: torch.Tensor) -> tuple[float, float]:
    """Weight SQNR in dB and relative L2 error."""
    signal = w.double().pow(2).sum().item()
    noise = (w.double() - wq.double()).pow(2).sum().item()
    rel = math.sqrt(noise / signal) if signal else 0.0
    sqnr = 10 * math.log10(signal / noise) if noise else math.inf
    return sqnr, rel


def state_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, as the model holds them."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def packed_weight_bytes(params: int, n_scales: int, bits: int) -> int:
    """Bytes of b-bit packed integers plus float scales."""
    return math.ceil(params * bits / 8) + n_scales * SCALE_BITS // 8


def quantize(
    model: nn.Module,
    bits: int = 4,
    block: int = 32,
    method: str = "l2",
    *,
    rounds: int = DEFAULT_ROUNDS,
    layout: str = "auto",
    act_bits: int | None = 8,
    act_block: int | None = None,
    include: tuple[str, ...] = ("*",),
    exclude: tuple[str, ...] = (),
    quantize_linear: bool = False,
    quantize_image_input: bool = False,
    progress: bool = False,
) -> tuple[nn.Module, QuantReport]:
    """Return a DSConv copy of `model` and a per-layer report; `model` is left untouched.

    Every nn.Conv2d (and subclass) whose name matches an `include` glob and no `exclude`
    glob becomes a DSConv layer with `bits`-bit VQK and one KDS per `block` slice; linear
    layers stay float unless `quantize_linear`. Conv inputs are rounded to BFP with
    `act_bits`-bit mantissas over `act_block` channels (default: `block`; None: float
    inputs), except the first conv's input (the image) unless `quantize_image_input`.
    """
    started = time.perf_counter()
    fmt = WeightFormat(bits, block, method, rounds, layout)
    act = ActFormat(act_bits, act_block or block) if act_bits is not None else None
    qmodel = copy.deepcopy(model).eval()
    report = QuantReport(fmt, act, model_float_bytes=state_bytes(model))
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
            to_dsconv(module, fmt, layer_act)
            _fill_quantized(row, module, w, fmt, layer_act, image_input=name == first_conv)
            saved += row.float_bytes - row.packed_bytes
        report.layers.append(row)
    report.model_quantized_bytes = report.model_float_bytes - saved
    report.seconds = time.perf_counter() - started
    return qmodel, report


def _describe(name: str, module: nn.Module) -> LayerReport:
    w = module.weight
    return LayerReport(
        name=name, kind=layer_kind(module), shape=list(w.shape), groups=getattr(module, "groups", 1),
        params=w.numel(), quantized=False, float_bytes=w.numel() * w.element_size(),
        packed_bytes=w.numel() * w.element_size(),
    )


def _keep_float_reason(name, module, include, exclude, quantize_linear) -> str:
    if isinstance(module, nn.Linear) and not quantize_linear:
        return "linear layers stay float (quantize_linear / --quantize-linear to change)"
    pattern = _matches(name, exclude)
    if pattern:
        return f"excluded by pattern {pattern!r}"
    if not _matches(name, include):
        return "matches no include pattern"
    return ""


def _fill_quantized(row, module, w, fmt, act, image_input) -> None:
    row.quantized = True
    row.bits, row.block, row.layout = fmt.bits, fmt.block, module.layout.kind
    row.act = f"bfp{act.bits}/{act.block}" if act else ("float (image input)" if image_input else "float")
    n_scales = module.kds.numel()
    row.packed_bytes = packed_weight_bytes(row.params, n_scales, fmt.bits)
    row.bits_per_weight = fmt.bits + SCALE_BITS * n_scales / row.params
    row.sqnr_db, row.rel_error = _weight_error(w, module.weight.detach())
