"""Model surgery: copy a float model and swap its convs for DSConv layers, with a report."""
from __future__ import annotations

import copy
import fnmatch
import itertools
import math
import reprlib
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.fx
import torch.nn as nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize, remove_spectral_norm, remove_weight_norm
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from tqdm.auto import tqdm

from .errors import DsqError, DsqWarning
from .formats import DEFAULT_ROUNDS, DEFAULT_SUM_WEIGHT, ActFormat, WeightFormat, packed_size
from .formats.spec import check_bits
from .nn import check_backend, layer_kind, set_backend, to_dsconv

# How KDS scales are stored. The model in memory already uses the rounded scales, so a saved
# file reloads bit-identical. float16 is the default: over the 16 points of a ResNet-20 sweep on
# all 10 000 CIFAR-10 test images (bits 2-8, blocks 8-64) it moved top-1 by -0.14 to +0.18
# points, +0.001 on average, against float32 (docs/file-format.md, "Scale precision").
SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
DEFAULT_SCALE_DTYPE = "float16"
# Depthwise convs hold few weights but carry much of a MobileNet/EfficientNet's error at
# 4 bits (EfficientNet-Lite0 data-free: 23/100 with them at 4 bits, 75/100 at 8; docs/calibration.md):
# they stay at 8 bits unless asked otherwise; the report shows it.
DEFAULT_DEPTHWISE_BITS = 8
# Every layer the report lists: convs of any kind (only Conv2d is quantized) and linear layers.
CONV_LIKE = (nn.modules.conv._ConvNd, nn.Linear)
SUPPORTED = (nn.Conv2d, nn.Linear)
# Dtypes whose models are quantized as a float32 copy (BFP steps and CPU kernels need float32's range).
LOW_PRECISION = (torch.float16, torch.bfloat16)
# Old-style weight hooks (torch.nn.utils.spectral_norm / weight_norm): what they are, how to fold them.
WEIGHT_HOOKS = {SpectralNorm: ("spectral norm", remove_spectral_norm), WeightNorm: ("weight norm", remove_weight_norm)}


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
    warnings: list[str] = field(default_factory=list)  # one line each: what the user likely did not mean

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
            "warnings": self.warnings,
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
    inputs), except the input of the conv that reads the image (the first to run) unless
    `quantize_image_input`. KDS scales are rounded to `scale_dtype` ("float16" or "float32"),
    the precision a saved file keeps them in. The copy computes with `backend` (see
    dsq.nn.set_backend), in float64 for a float64 model, in float32 otherwise.

    Every conv-like layer gets a row, with the reason it stayed float where it did; folded
    weight parametrizations are noted on their rows. `report.warnings` (also issued as
    DsqWarning) names globs that match no layer, a half-precision model quantized as a float32
    copy, and a run that quantized nothing. DsqError for a model dsq cannot quantize
    (`check_model`) and for bad settings.
    """
    started = time.perf_counter()
    check_model(model)
    include, exclude = _globs(include, "include"), _globs(exclude, "exclude")
    layer_bits = _layer_bits(layer_bits)
    if depthwise_bits is not None:
        check_bits(depthwise_bits, "depthwise bits")
    check_backend(backend)
    settings = dict(bits=bits, block=block, method=method, rounds=rounds, sum_weight=sum_weight, layout=layout,
                    act_bits=act_bits,
                    act_block=act_block, include=list(include), exclude=list(exclude),
                    layer_bits=layer_bits, depthwise_bits=depthwise_bits,
                    quantize_linear=quantize_linear, quantize_image_input=quantize_image_input,
                    scale_dtype=scale_dtype)
    stored_dtype = scale_torch_dtype(scale_dtype)
    fmt = WeightFormat(bits, block, method, rounds, layout, sum_weight)
    act = ActFormat(act_bits, block if act_block is None else act_block) if act_bits is not None else None
    overrides = {glob: replace(fmt, bits=b) for glob, b in layer_bits.items()}
    qmodel, notes = _working_copy(model)
    report = QuantReport(fmt, act, settings, model_float_bytes=state_bytes(qmodel), warnings=notes)
    targets = [(n, m) for n, m in qmodel.named_modules() if isinstance(m, CONV_LIKE)]
    image_conv = _image_conv(qmodel, targets)
    saved = 0
    for name, module in tqdm(targets, desc="quantizing", unit="layer", disable=not progress):
        row = _describe(name, module)
        reason = _keep_float_reason(name, module, include, exclude, quantize_linear)
        if reason:
            row.note = reason
        else:
            folded = _fold_weight_reparametrization(module)
            w = module.weight.detach().clone()
            layer_act = act if (name != image_conv or quantize_image_input) else None
            layer_fmt, row.note = _layer_format(name, row.kind, fmt, overrides, depthwise_bits)
            row.note = "; ".join(filter(None, [folded, row.note]))
            to_dsconv(module, layer_fmt, layer_act)
            _round_scales(name, module, stored_dtype)
            _fill_quantized(row, module, w, layer_fmt, layer_act, scale_dtype, image_input=name == image_conv)
            saved += row.float_bytes - row.packed_bytes
        report.layers.append(row)
    report.model_quantized_bytes = report.model_float_bytes - saved
    report.warnings += _unmatched_globs([n for n, _ in targets], include=include, exclude=exclude,
                                        layer_bits=layer_bits)
    if not report.quantized_layers:
        report.warnings.append("no layer was quantized: the model has no Conv2d layer (or Linear layer, with "
                               "quantize_linear) that the include and exclude globs select")
    if backend != "simulate":
        set_backend(qmodel, backend)
    for message in report.warnings:
        warnings.warn(message, DsqWarning, stacklevel=2)
    report.seconds = time.perf_counter() - started
    return qmodel, report


def check_model(model) -> None:
    """DsqError unless `model` is a Python nn.Module (not TorchScript) whose every parameter and
    buffer is initialised, holds values (not on the meta device) and, if floating, is finite."""
    if not isinstance(model, nn.Module):
        raise DsqError(f"dsq.quantize needs a torch.nn.Module, not a {type(model).__name__} value: "
                       "build the model and load its weights first")
    scripted = next((name for name, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)), None)
    if scripted is not None:
        where = f"layer {scripted!r} of the model is" if scripted else "the model is"
        raise DsqError(f"{where} TorchScript (torch.jit.script/trace): dsq cannot swap layers inside it; "
                       "pass the Python nn.Module instead")
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        _check_tensor(name, tensor)


def _check_tensor(name: str, tensor: torch.Tensor) -> None:
    if is_lazy(tensor):
        raise DsqError(f"{name} is uninitialised (a lazy layer): run the model once on a real input first")
    if tensor.is_meta:
        raise DsqError(f"{name} is on the meta device and holds no values: load the model's weights first")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise DsqError(f"{name} holds NaN or Inf values, so no accuracy claim about the model would mean "
                       "anything: fix or retrain the model first")


def _working_copy(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """An eval-mode copy of `model` to quantize (float32 where it held float16/bfloat16) and
    the warnings that say what changed."""
    copied = copy.deepcopy(model).eval()
    low = sorted({str(t.dtype).removeprefix("torch.") for t in itertools.chain(copied.parameters(), copied.buffers())
                  if t.dtype in LOW_PRECISION})
    if not low:
        return copied, []
    return copied.float(), [f"the model holds {' and '.join(low)} tensors: quantized a float32 copy of it, "
                            "which takes float32 inputs"]


def _fold_weight_reparametrization(module: nn.Module) -> str:
    """Make a parametrized weight (torch.nn.utils.parametrize, spectral or weight norm) a plain
    one with its eval-mode value, in place; return what was folded ("" if nothing)."""
    if parametrize.is_parametrized(module, "weight"):
        _own_class(module)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        return "weight parametrization folded into the weight"
    for hook in list(module._forward_pre_hooks.values()):
        if type(hook) in WEIGHT_HOOKS and hook.name == "weight":
            kind, remove = WEIGHT_HOOKS[type(hook)]
            remove(module, "weight")
            return f"{kind} folded into the weight"
    return ""


def _own_class(module: nn.Module) -> None:
    """Give `module` a private copy of its class: a deep copy shares the parametrized class that
    torch.nn.utils.parametrize made for the original, and removing a parametrization edits that class."""
    cls = type(module)
    namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


class _LayerTracer(torch.fx.Tracer):
    """Traces a forward down to its conv and linear layers (their own forwards stay opaque)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, CONV_LIKE) or super().is_leaf_module(module, qualified_name)


def _image_conv(model: nn.Module, targets: list[tuple[str, nn.Module]]) -> str | None:
    """The Conv2d that reads the image: the first to run as torch.fx traces the forward, or the
    first registered when the forward cannot be traced (data-dependent control flow)."""
    convs = [name for name, m in targets if isinstance(m, nn.Conv2d)]
    try:
        graph = _LayerTracer().trace(model)
    except Exception:  # any error of the user's forward on symbolic values: fall back to the registration order
        return next(iter(convs), None)
    called = [node.target for node in graph.nodes if node.op == "call_module"]
    return next((name for name in called if name in convs), next(iter(convs), None))


def _globs(patterns, what: str) -> tuple[str, ...]:
    """`patterns` (one glob or an iterable of globs) as a tuple; DsqError for anything else."""
    if isinstance(patterns, str):
        return (patterns,)
    globs = tuple(patterns) if isinstance(patterns, Iterable) and not isinstance(patterns, Mapping) else None
    if globs is None or not all(isinstance(g, str) for g in globs):
        raise DsqError(f"{what} must be a glob or a list of globs (strings), got {reprlib.repr(patterns)}")
    return globs


def _layer_bits(layer_bits) -> dict[str, int]:
    """`layer_bits` (None or a mapping glob -> bits) as a checked dict."""
    if layer_bits is None:
        return {}
    if not isinstance(layer_bits, Mapping) or not all(isinstance(g, str) for g in layer_bits):
        raise DsqError(f"layer_bits must map globs (strings) to bits, e.g. {{'layer1.*': 8}}, "
                       f"got {reprlib.repr(layer_bits)}")
    return {glob: check_bits(b, f"bits of layer glob {glob!r}") for glob, b in layer_bits.items()}


def _unmatched_globs(names: list[str], **globs: Iterable[str]) -> list[str]:
    """A warning for each glob (keyword: what it is for) that matches none of `names`."""
    return [f"{what} glob {glob!r} matches no conv or linear layer: check its spelling against the layer names"
            for what, patterns in globs.items() for glob in patterns
            if not any(fnmatch.fnmatchcase(name, glob) for name in names)]


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
    if not isinstance(module, SUPPORTED):
        return f"{type(module).__name__} is not supported: dsq quantizes Conv2d and Linear layers"
    if isinstance(module, nn.Linear) and not quantize_linear:
        return "linear layer kept float (quantize_linear=True quantizes it)"
    pattern = _matches(name, exclude)
    if pattern:
        return f"excluded by pattern {pattern!r}"
    if not _matches(name, include):
        return "matches no include pattern"
    return ""


def _round_scales(name: str, module: nn.Module, dtype: torch.dtype) -> None:
    """Round the layer's KDS to `dtype` in place (kept in the layer's own dtype in memory)."""
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
