"""DSConv layers: drop-ins for nn.Conv2d / nn.Linear that hold int8 VQK and float KDS.

A converted layer keeps its class's own forward (so conv subclasses that pad TF-style,
as EfficientNet-Lite's do, behave as before); it only changes two things: `weight` is the
dequantized `alpha * q` computed from the stored integers, and the input is rounded to
block floating point (BFP) first. This is the "simulated" backend: float arithmetic on
exactly the values that the integer kernel multiplies. `set_backend(model, "int")` runs the
layers on integers instead (dsq.nn.int_backend), `set_backend(model, "exact")` runs the
simulation in float64, rounded once (dsq.nn.exact_backend): the reference int equals bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import DsqError
from ..formats import ActFormat, BlockLayout, WeightFormat, bfp_quantize, dequantize, quantize_weight, round_scales
from .exact_backend import ExactWeight
from .int_backend import IntWeight
from .int_kernel import rounds_bfp_fast
from .int_plan import check_int_device, check_int_kernel
from .trainable_layer import LATENT, bfp_straight_through, trainable_mode, trained_weight, weight_parameter

BACKENDS = ("simulate", "int", "exact")


class DSConvMixin:
    """The DSConv behaviour, mixed in front of a conv or linear class."""

    act_dim = 1  # the channel axis of the input that BFP blocks run along
    backend = "simulate"  # or "int", "exact": see set_backend

    def _install(self, weight: torch.Tensor, fmt: WeightFormat, act: ActFormat | None) -> None:
        qw = quantize_weight(weight, fmt, getattr(self, "groups", 1))
        self._parameters.pop("weight", None)
        self.register_buffer("vqk", qw.vqk)
        self.register_buffer("kds", qw.kds.to(weight.dtype))  # the dequantized weight keeps the layer's dtype
        self.weight_format = fmt
        self.layout = qw.layout
        self.act_format = act
        self._cache = None

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight alpha * q (cached until VQK or KDS change)."""
        if "vqk" not in self._buffers:  # during the wrapped class's own __init__
            if "weight" not in self._parameters:
                raise AttributeError("weight")
            return self._parameters["weight"]
        if self.backend != "simulate":
            return IntWeight(self) if self.runs_int else ExactWeight(self)
        trained = weight_parameter(self)  # a trainable layer's latent or rounding (dsq.nn.train)
        sources = (self.vqk, self.kds) if trained is None else (self.vqk, self.kds, trained)
        if _tracing() or (torch.is_grad_enabled() and any(t.requires_grad for t in sources)):
            return self._dequantized(trained)  # traced or training: computed from VQK and KDS, never cached
        key = tuple((id(t), t.data_ptr(), t._version) for t in sources) + (self.kds.dtype,)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._dequantized(trained))
        return self._cache[1]

    def __getstate__(self) -> dict:
        """Pickled (torch.save of the module, copy.deepcopy) without the cached float weight: a
        pickle holds the integers and scales only, never a float copy (docs/yolo.md)."""
        return {**super().__getstate__(), "_cache": None}

    def __setattr__(self, name: str, value) -> None:
        """A new `weight` is taken as a BatchNorm fold (`scale_outputs`): how torch's
        fuse_conv_bn_eval and ultralytics' fuse() fold one (`conv.weight, conv.bias = ...`)."""
        if name == "weight" and "vqk" in self.__dict__.get("_buffers", ()):
            self.scale_outputs(output_scales(self._dequantized(weight_parameter(self)), value))
        else:
            super().__setattr__(name, value)

    @torch.no_grad()
    def scale_outputs(self, scale: torch.Tensor) -> None:
        """Multiply output channel o by `scale[o]`: one multiply per output channel on the KDS (every
        block lies within one output channel), rounded to the scale dtype; VQK and bias unchanged. A
        trainable layer's KDS parameter stays unrounded (freeze rounds it) and its latent weight scales along."""
        per_channel = scale.to(self.kds).reshape(-1, *[1] * (self.kds.dim() - 1))
        if trainable_mode(self) is None:
            what = f"folding into a {type(self).__name__}"
            self.kds.copy_(round_scales(self.kds * per_channel, self.weight_format.scale_dtype, what))
            return
        self.kds.mul_(per_channel)
        if LATENT in self._parameters:  # alpha * round(latent / alpha): both scaled, the same codes
            self.latent.mul_(scale.to(self.latent).reshape(-1, *[1] * (self.latent.dim() - 1)))

    @torch.no_grad()
    def fold_batchnorm(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        """Fold the eval-mode BatchNorm `bn` that follows this layer into it: KDS times
        gamma / sqrt(var + eps) per output channel (`scale_outputs`), bias (b - mean) * that + beta."""
        scale = torch.rsqrt(bn.running_var + bn.eps)
        shift = -bn.running_mean * scale if self.bias is None else (self.bias - bn.running_mean) * scale
        if bn.affine:
            scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
        self.scale_outputs(scale)
        self.bias = nn.Parameter(shift.to(self.kds.dtype))

    def _dequantized(self, trained: torch.Tensor | None) -> torch.Tensor:
        if trained is None:
            return dequantize(self.vqk, self.kds, self.layout).reshape(self.vqk.shape)
        return trained_weight(self)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input rounded to BFP (unchanged when activation quantization is off); while
        training, the gradient passes straight through the rounding to earlier layers."""
        if self.act_format is None:
            return x
        if _tracing():
            return bfp_quantize(x, self.act_format, self.act_dim)
        if x.requires_grad and torch.is_grad_enabled():
            return bfp_straight_through(x, self.act_format, self.act_dim)
        if rounds_bfp_fast(x, self.act_dim):  # the same numbers in one pass
            return torch.ops.dsq.bfp_round(x, self.act_format.bits, self.act_format.block)
        return bfp_quantize(x, self.act_format, self.act_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x if self.runs_int else self.quantize_input(x))  # the int kernel encodes x itself

    @property
    def runs_int(self) -> bool:
        """Whether this layer computes on integers: the int backend and a BFP input (a float
        input has no mantissas, so such a layer computes as under "exact")."""
        return self.backend == "int" and self.act_format is not None

    @property
    def kind(self) -> str:
        """conv, depthwise, grouped or linear."""
        return layer_kind(self)

    def extra_repr(self) -> str:
        fmt, act = self.weight_format, self.act_format
        act_txt = act.label if act else "float"
        return (
            f"{super().extra_repr()}, bits={fmt.bits}, block={fmt.block}, "
            f"layout={self.layout.kind}, method={fmt.method}, act={act_txt}"
        )


class DSConv2d(DSConvMixin, nn.Conv2d):
    """nn.Conv2d with b-bit VQK weights, per-slice KDS scales and BFP inputs.

    Takes nn.Conv2d's arguments plus `weight_format` and `act_format` (None: float input);
    its initial weight is quantized at once. `to_dsconv` converts a trained conv.
    """

    def __init__(
        self, *args, weight_format: WeightFormat = WeightFormat(), act_format: ActFormat | None = ActFormat(), **kwargs
    ):
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._install(self._parameters["weight"].detach(), weight_format, act_format)


class DSLinear(DSConvMixin, nn.Linear):
    """nn.Linear quantized as a 1x1 DSConv (blocks along the input features)."""

    act_dim = -1

    def __init__(
        self, *args, weight_format: WeightFormat = WeightFormat(), act_format: ActFormat | None = ActFormat(), **kwargs
    ):
        nn.Linear.__init__(self, *args, **kwargs)
        self._install(self._parameters["weight"].detach(), weight_format, act_format)


_CLASSES: dict[type, type] = {nn.Conv2d: DSConv2d, nn.Linear: DSLinear}


def dsconv_class(cls: type) -> type:
    """The DSConv class for a conv/linear class: DSConv2d, DSLinear, or a cached subclass
    `DS<Name>(DSConvMixin, cls)` that keeps a conv subclass's own forward."""
    if cls not in _CLASSES:
        if not issubclass(cls, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"{cls.__name__} is not an nn.Conv2d or nn.Linear")
        attrs = {"__module__": __name__, "__doc__": f"DSConv version of {cls.__qualname__}."}
        if issubclass(cls, nn.Linear):
            attrs["act_dim"] = -1
        _CLASSES[cls] = type(f"DS{cls.__name__}", (DSConvMixin, cls), attrs)
    return _CLASSES[cls]


def to_dsconv(module: nn.Module, weight_format: WeightFormat, act_format: ActFormat | None) -> nn.Module:
    """Turn `module` (an nn.Conv2d / nn.Linear or subclass) into its DSConv version in place."""
    weight = module.weight.detach()
    module.__class__ = dsconv_class(type(module))
    module._install(weight, weight_format, act_format)
    return module


def set_backend(model: nn.Module, backend: str, kernel: str = "auto") -> list[str]:
    """Make every DSConv layer of `model` compute with `backend`, and return the names of the
    layers that now run on integers.

    "simulate": torch's float32 conv on the dequantized weights and BFP-rounded inputs. "int":
    int8 VQK x int8 BFP mantissas summed in int32, then one float64 multiply-add per block and
    tap, rounded once (dsq.nn.int_backend); layers with a float input (the image input, or
    activation quantization off) compute as under "exact". "exact": the simulated arithmetic
    in float64, rounded once to float32 (dsq.nn.exact_backend). "int" and "exact" are for
    inference and refuse a trainable model.

    `kernel` chooses how "int" runs: "auto" takes the C++ CPU kernel (dsq/nn/csrc) where it
    applies (ungrouped convs and linear layers with channel-layout weights, on a CPU with
    AVX-512), with the best instruction set here (AMX-INT8, else VNNI, else AVX-512BW), and the
    eager path elsewhere; "amx", "vnni" or "avx512bw" force those tiles (DsqError where the CPU
    lacks them); "eager" takes the eager path everywhere. The result is the same bit for bit.

    Args:
        model: a model with DSConv layers (from dsq.quantize or dsq.load), changed in place.
        backend: "simulate", "int" or "exact" (BACKENDS).
        kernel: "auto", "amx", "vnni", "avx512bw" or "eager" (INT_KERNELS), for the "int" backend.

    Returns:
        The names of the DSConv layers that now run on integers (none unless `backend` is
        "int"). DsqError for an unknown backend or kernel, a model without DSConv layers,
        "int" or "exact" on a trainable model or on scales that are not float32, and "int"
        without BFP inputs or on a device without an int8 matrix product.

    Example:
        >>> import torch, torch.nn as nn, dsq
        >>> qmodel, _ = dsq.quantize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1)), bits=4)
        >>> dsq.nn.set_backend(qmodel, "int", kernel="eager")  # '0' reads the image: a float input
        ['2']
        >>> qmodel(torch.randn(1, 3, 8, 8)).shape
        torch.Size([1, 8, 6, 6])
    """
    check_backend(backend)
    check_int_kernel(kernel)
    layers = {name: m for name, m in model.named_modules() if is_dsconv(m)}
    if not layers:
        raise DsqError("the model has no DSConv layers: quantize it first (dsq.quantize)")
    if backend != "simulate":
        wide = next((name for name, m in layers.items() if m.kds.dtype != torch.float32), None)
        if wide is not None:
            raise DsqError(
                f"the {backend} backend computes in float32, but layer {wide!r} is "
                f"{str(layers[wide].kds.dtype).removeprefix('torch.')}: use the simulate backend, "
                "or quantize a float32 model"
            )
        trainable = [name for name, m in layers.items() if trainable_mode(m)]
        if trainable:
            raise DsqError(
                f"the model is trainable ({len(trainable)} DSConv layers, e.g. {trainable[0]!r}) and the "
                f"{backend} backend would run on stale integers: dsq.nn.freeze(model) first"
            )
    if backend == "int":
        if all(m.act_format is None for m in layers.values()):
            raise DsqError(
                "the int backend needs BFP inputs, but every layer has a float input: "
                "quantize with activation quantization on (act_bits, --act)"
            )
        for m in layers.values():
            check_int_device(m.vqk.device)
    for m in layers.values():
        m.backend, m.int_kernel = backend, kernel
        m._cache = None  # the int and exact backends need no float32 weight
    return [name for name, m in layers.items() if m.runs_int]


def output_scales(weight: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """The factors s, one per output channel, with `new` = s * `weight` (what folding a BatchNorm
    makes of a weight); DsqError when `new` is not such a rescale of `weight`."""
    if not isinstance(new, torch.Tensor) or new.shape != weight.shape:
        raise DsqError(
            f"a DSConv layer's weight is its integers times its scales: it takes only a rescale of each output "
            f"channel (a BatchNorm fold) of shape {tuple(weight.shape)}, not {_shape_of(new)}; quantize the new weight"
        )
    tolerance = 4 * torch.finfo(new.dtype if new.is_floating_point() else weight.dtype).eps
    old, new = weight.detach().double().flatten(1), new.detach().to(weight.device, torch.float64).flatten(1)
    norm = (old * old).sum(1)
    scale = torch.where(norm > 0, (old * new).sum(1) / norm.clamp_min(torch.finfo(torch.float64).tiny), 1.0)
    residual = (new - scale[:, None] * old).abs().amax(1)
    if (residual > tolerance * new.abs().amax(1)).any():
        raise DsqError(
            "a DSConv layer's weight is its integers times its scales: it takes only a rescale of each output "
            "channel (a BatchNorm fold), not other new values; quantize the new weight (dsq.quantize)"
        )
    return scale


def _shape_of(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"


def _tracing() -> bool:
    """Whether torch.export, torch.compile or torch.jit.trace is recording the forward: the graph
    must hold the dequantization itself (VQK and KDS, not a cached float copy of the weight), and
    a tracer's fake tensors have no data pointer to key a cache on."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def check_backend(backend: str) -> None:
    """DsqError unless `backend` is one of BACKENDS."""
    if backend not in BACKENDS:
        raise DsqError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")


def is_dsconv(module: nn.Module) -> bool:
    return isinstance(module, DSConvMixin)


def layer_kind(module: nn.Module) -> str:
    """conv, depthwise, grouped or linear: the kinds the per-layer report names."""
    if isinstance(module, nn.Linear):
        return "linear"
    if module.groups == 1:
        return "conv"
    if module.groups == module.in_channels:
        return "depthwise"
    return "grouped"


def from_quantized(
    module: nn.Module,
    vqk: torch.Tensor,
    kds: torch.Tensor,
    layout: BlockLayout,
    weight_format: WeightFormat,
    act_format: ActFormat | None,
) -> nn.Module:
    """Turn `module` into its DSConv version in place with the given VQK and KDS (no fitting),
    e.g. to load a saved model into a float skeleton."""
    module.__class__ = dsconv_class(type(module))
    module._parameters.pop("weight", None)
    module.register_buffer("vqk", vqk)
    module.register_buffer("kds", kds)
    module.weight_format, module.layout, module.act_format = weight_format, layout, act_format
    module._cache = None
    return module
