"""Model surgery: copy a float model and swap its convs for DSConv layers, with a report."""

from __future__ import annotations

import collections
import copy
import fnmatch
import itertools
import time
import warnings

import torch
import torch.fx
import torch.nn as nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize, remove_spectral_norm, remove_weight_norm
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from tqdm.auto import tqdm

from .config import QuantConfig, quant_config
from .errors import DsqError, DsqWarning
from .finite import all_finite
from .formats import WeightFormat, round_scales
from .metrics import state_bytes
from .nn import check_backend, layer_kind, set_backend, to_dsconv
from .quant_report import QuantReport, layer_row

# Every layer the report lists: convs of any kind (only Conv2d is quantized) and linear layers.
CONV_LIKE = (nn.modules.conv._ConvNd, nn.Linear)
SUPPORTED = (nn.Conv2d, nn.Linear)
# Dtypes whose models are quantized as a float32 copy (BFP steps and CPU kernels need float32's range).
LOW_PRECISION = (torch.float16, torch.bfloat16)
# Old-style weight hooks (torch.nn.utils.spectral_norm / weight_norm): what they are, how to fold them.
WEIGHT_HOOKS = {SpectralNorm: ("spectral norm", remove_spectral_norm), WeightNorm: ("weight norm", remove_weight_norm)}


def quantize(
    model: nn.Module, config: QuantConfig | None = None, *, backend: str = "simulate", progress: bool = False, **options
) -> tuple[nn.Module, QuantReport]:
    """Return a DSConv copy of `model` quantized as `config` says, and a per-layer report;
    `model` is left untouched.

    Args:
        model: a float nn.Module (`check_model`).
        config: the recipe (dsq.config.QuantConfig); or leave it out and pass the keyword form,
            e.g. `bits=4, block=32, exclude=("fc",)`: the options of dsq.config.quant_config, whose
            defaults are dsq's (float16 scales, 8-bit BFP inputs, depthwise convs at 8 bits,
            linear layers float).
        backend: how the copy computes (see dsq.nn.set_backend), in float64 for a float64
            model, in float32 otherwise.
        progress: show a progress bar.

    Returns:
        (qmodel, report): every nn.Conv2d (and subclass) the config selects is a DSConv layer
        holding its own resolved formats, its KDS rounded to the scale dtype; every conv-like
        layer has a report row, with the reason it stayed float where it did; folded weight
        parametrizations are noted on their rows. `report.warnings` (also issued as DsqWarning)
        names globs that match no layer, a half-precision model quantized as a float32 copy, and
        a run that quantized nothing. DsqError for a model dsq cannot quantize and for bad settings.

    Example:
        >>> import torch.nn as nn, dsq
        >>> qmodel, report = dsq.quantize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1)), bits=4)
        >>> [(row.name, row.bits, row.act) for row in report.layers]
        [('0', 4, 'float (image input)'), ('1', 4, 'bfp8/32')]
    """
    started = time.perf_counter()
    check_model(model)
    if config is None:
        config = quant_config(**options)
    elif options:
        raise DsqError(f"dsq.quantize takes a QuantConfig or keyword settings, not both (got {', '.join(options)})")
    elif not isinstance(config, QuantConfig):
        raise DsqError(f"dsq.quantize needs a dsq.config.QuantConfig, not a {type(config).__name__} value")
    check_backend(backend)
    qmodel, notes, shared = _working_copy(model)
    report = QuantReport(config, model_float_bytes=state_bytes(qmodel), warnings=notes)
    targets = [(n, m) for n, m in qmodel.named_modules() if isinstance(m, CONV_LIKE)]
    image_conv = _image_conv(qmodel, targets)
    saved = 0
    for name, module in tqdm(targets, desc="quantizing", unit="layer", disable=not progress):
        fmt, note = _layer_format(config, name, module, image_input=name == image_conv)
        if fmt is None:
            _own_weight(module, shared)
            report.layers.append(layer_row(name, module.weight, module, note=note))
            continue
        folded = _fold_weight_reparametrization(module)
        w = module.weight.detach()  # the float weight, which to_dsconv replaces and leaves as it is
        act = config.act if (name != image_conv or config.quantize_image_input) else None
        to_dsconv(module, fmt, act)
        module.kds.copy_(round_scales(module.kds, fmt.scale_dtype, f"layer {name!r}"))
        row = layer_row(name, w, module, note="; ".join(filter(None, [folded, note])), image_input=name == image_conv)
        saved += row.float_bytes - row.packed_bytes
        report.layers.append(row)
    report.model_quantized_bytes = report.model_float_bytes - saved
    report.warnings += _unmatched_globs(config, [n for n, _ in targets])
    if not report.quantized_layers:
        report.warnings.append(
            "no layer was quantized: the model has no Conv2d layer (or Linear layer, with "
            "quantize_linear) that the include and exclude globs select"
        )
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
        raise DsqError(
            f"dsq.quantize needs a torch.nn.Module, not a {type(model).__name__} value: "
            "build the model and load its weights first"
        )
    scripted = next((name for name, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)), None)
    if scripted is not None:
        where = f"layer {scripted!r} of the model is" if scripted else "the model is"
        raise DsqError(
            f"{where} TorchScript (torch.jit.script/trace): dsq cannot swap layers inside it; "
            "pass the Python nn.Module instead"
        )
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        _check_tensor(name, tensor)


def _check_tensor(name: str, tensor: torch.Tensor) -> None:
    if is_lazy(tensor):
        raise DsqError(f"{name} is uninitialised (a lazy layer): run the model once on a real input first")
    if tensor.is_meta:
        raise DsqError(f"{name} is on the meta device and holds no values: load the model's weights first")
    if not all_finite(tensor):
        raise DsqError(
            f"{name} holds NaN or Inf values, so no accuracy claim about the model would mean "
            "anything: fix or retrain the model first"
        )


def _working_copy(model: nn.Module) -> tuple[nn.Module, list[str], set[int]]:
    """An eval-mode copy of `model` to quantize (float32 where it held float16/bfloat16), the
    warnings that say what changed, and the ids of the weights it shares with `model`.

    The copy shares the plain weight of every layer dsq may quantize instead of copying it (most
    of a deep copy's time): quantizing a layer only reads its weight before dropping it, and a
    layer that stays float gets its own copy (`_own_weight`). A weight that another layer also
    holds, or that a float16 model's conversion would change in place, is copied.
    """
    low = sorted(
        {
            str(t.dtype).removeprefix("torch.")
            for t in itertools.chain(model.parameters(), model.buffers())
            if t.dtype in LOW_PRECISION
        }
    )
    holders = collections.Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    weights = (m._parameters.get("weight") for m in model.modules() if isinstance(m, SUPPORTED) and not low)
    memo = {id(w): w for w in weights if w is not None and holders[id(w)] == 1}
    shared = set(memo)  # before the deep copy adds its own entries
    copied = copy.deepcopy(model, memo).eval()
    if not low:
        return copied, [], shared
    warning = f"the model holds {' and '.join(low)} tensors: quantized a float32 copy of it, which takes float32 inputs"
    return copied.float(), [warning], set()


def _own_weight(module: nn.Module, shared: set[int]) -> None:
    """Give a layer that stays float its own copy of a weight `_working_copy` shared."""
    weight = module._parameters.get("weight")
    if weight is not None and id(weight) in shared:
        module._parameters["weight"] = copy.deepcopy(weight)


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


def _unmatched_globs(config: QuantConfig, names: list[str]) -> list[str]:
    """A warning for each include glob and rule glob of `config` that matches none of `names`."""
    globs = [("include", glob) for glob in config.include]
    globs += [
        ("exclude" if r.keep_float else "layer_bits" if r.changes else "rule", r.name)
        for r in config.rules
        if r.name is not None
    ]
    return [
        f"{what} glob {glob!r} matches no conv or linear layer: check its spelling against the layer names"
        for what, glob in globs
        if not any(fnmatch.fnmatchcase(name, glob) for name in names)
    ]


def layer_kinds(module: nn.Module, image_input: bool) -> set[str]:
    """The kinds (dsq.config.KINDS) a layer rule can name this layer by."""
    kinds = {layer_kind(module)}
    if isinstance(module, nn.Conv2d) and module.groups == 1 and tuple(module.kernel_size) == (1, 1):
        kinds.add("pointwise")
    if image_input:
        kinds.add("image_input")
    return kinds


def _layer_format(
    config: QuantConfig, name: str, module: nn.Module, image_input: bool
) -> tuple[WeightFormat | None, str]:
    """The weight format of one layer (None: it stays float) and the note that explains a
    deviation from the config's format."""
    if not isinstance(module, SUPPORTED):
        return None, f"{type(module).__name__} is not supported: dsq quantizes Conv2d and Linear layers"
    rule = config.rule_for(name, layer_kinds(module, image_input))
    if rule is not None and rule.keep_float:
        return None, rule.note(config.weight.bits)
    if not any(fnmatch.fnmatchcase(name, glob) for glob in config.include):
        return None, "matches no include pattern"
    if rule is None:
        return config.weight, ""
    return rule.weight_format(config.weight), rule.note(config.weight.bits)
