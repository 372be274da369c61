"""DSConv layers that train: straight-through gradients through the VQK rounding and BFP.

    make_trainable(model)   every DSConv layer's KDS becomes an nn.Parameter `kds`; with
                            weights="ste" a float `latent` weight (initialised to alpha * q)
                            is added and the integers are re-derived from it every forward:
                                w = alpha * clamp(round_ste(latent / alpha), lo, hi)
                            (rounding with an identity gradient, so latent and alpha both get
                            gradients, LSQ-style); with weights="fixed" the VQK stays put.
    freeze(model)           the trained integers back into the int8 `vqk` buffer, `kds` back
                            to a buffer, `latent` gone: an inference model again (same output).

BFP inputs pass gradients straight through (DSConvMixin.quantize_input); see docs/training.md.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import DsqError
from ..formats import ActFormat, BlockLayout, bfp_quantize
from ..formats.weights import code_range

WEIGHT_MODES = ("ste", "fixed")
LATENT = "latent"


class _RoundSTE(torch.autograd.Function):
    """torch.round forward, identity backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _BFPSTE(torch.autograd.Function):
    """bfp_quantize forward (the very same numbers), identity backward."""

    @staticmethod
    def forward(ctx, x, fmt, dim):
        return bfp_quantize(x, fmt, dim)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def bfp_straight_through(x: torch.Tensor, fmt: ActFormat, dim: int) -> torch.Tensor:
    """x rounded to BFP, with the gradient of the identity."""
    return _BFPSTE.apply(x, fmt, dim)


def latent_codes(latent: torch.Tensor, scale: torch.Tensor, bits: int, ste: bool = False) -> torch.Tensor:
    """clamp(round(latent / scale)) as floats; 0 where the scale is 0 (no NaN, no gradient there).

    `scale` is each weight's own KDS (BlockLayout.expand_scales). With `ste` the rounding
    passes gradients straight through, as in LSQ (the clamp does not: latent / scale beyond
    the code range gets none).
    """
    lo, hi = code_range(bits)
    zero = scale == 0
    v = torch.where(zero, torch.zeros_like(latent), latent / torch.where(zero, torch.ones_like(scale), scale))
    v = v.clamp(lo, hi)
    return _RoundSTE.apply(v) if ste else torch.round(v)


def _scales(kds: torch.Tensor, layout: BlockLayout, shape: torch.Size) -> torch.Tensor:
    return layout.expand_scales(kds).reshape(shape)


def ste_weight(latent: torch.Tensor, kds: torch.Tensor, layout: BlockLayout, bits: int) -> torch.Tensor:
    """alpha * clamp(round_ste(latent / alpha)): the weight of a weights="ste" layer."""
    scale = _scales(kds, layout, latent.shape)
    return latent_codes(latent, scale, bits, ste=True) * scale


def trainable_mode(layer: nn.Module) -> str | None:
    """"ste", "fixed", or None for a DSConv layer that is not trainable (frozen / inference)."""
    if LATENT in layer._parameters:
        return "ste"
    return "fixed" if "kds" in layer._parameters else None


def is_trainable(model: nn.Module) -> bool:
    """Whether any DSConv layer of `model` is trainable (not frozen)."""
    from .dsconv import is_dsconv  # imported here: dsconv imports this module

    return any(is_dsconv(m) and trainable_mode(m) for m in model.modules())


def _dsconv_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from .dsconv import is_dsconv  # imported here: dsconv imports this module

    layers = [(name, m) for name, m in model.named_modules() if is_dsconv(m)]
    if not layers:
        raise DsqError("the model has no DSConv layers: quantize it first (dsq.quantize) or build it with DSConv2d")
    return layers


def _qualified(name: str, leaf: str) -> str:
    return f"{name}.{leaf}" if name else leaf


def make_trainable(model: nn.Module, weights: str = "ste") -> dict[str, nn.Parameter]:
    """Make every DSConv layer of `model` trainable, in place; returns the new parameters by
    their qualified names ("<layer>.kds", "<layer>.latent"), in module order.

    weights="ste": each layer gets a float `latent` weight (initialised to alpha * q, so the
    output does not change) and computes alpha * clamp(round(latent / alpha)) with
    straight-through rounding; gradients reach `latent` and `kds`. weights="fixed": the VQK
    integers stay, only `kds` learns. Either way the KDS becomes the float32 nn.Parameter
    `kds` (the state_dict keeps its keys, plus `latent` for "ste"), BFP inputs pass gradients
    straight through, and the model's other parameters (biases, BatchNorm) are left as they
    are. Calling it again with the same `weights` changes nothing. `freeze` undoes it.
    """
    if weights not in WEIGHT_MODES:
        raise DsqError(f"unknown weights mode {weights!r}: use one of {', '.join(WEIGHT_MODES)}")
    layers = _dsconv_layers(model)
    for name, m in layers:
        if m.backend != "simulate":
            raise DsqError(f"layer {name!r} runs the {m.backend} backend, which has no gradient: "
                           "dsq.nn.set_backend(model, 'simulate') before make_trainable")
        mode = trainable_mode(m)
        if mode not in (None, weights):
            raise DsqError(f"layer {name!r} is already trainable with weights={mode!r}: "
                           f"dsq.nn.freeze(model) before make_trainable(weights={weights!r})")
    params = {}
    for name, m in layers:
        if trainable_mode(m) is None:
            kds = m._buffers.pop("kds").detach().float().clone()
            if weights == "ste":
                m.register_parameter(LATENT, nn.Parameter(m.vqk.float() * _scales(kds, m.layout, m.vqk.shape)))
            m.register_parameter("kds", nn.Parameter(kds))
            m._cache = None
        params[_qualified(name, "kds")] = m.kds
        if weights == "ste":
            params[_qualified(name, LATENT)] = m.latent
    return params


def parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The model's parameters in three groups, e.g. for optimizer groups with their own rates:
    "latent" (the STE latent weights), "kds" (the DSConv scales), "other" (biases, BatchNorm,
    layers left float)."""
    groups: dict[str, list[nn.Parameter]] = {LATENT: [], "kds": [], "other": []}
    dsconv_params = {}
    for _, m in _dsconv_layers(model):
        for leaf in (LATENT, "kds"):
            if leaf in m._parameters:
                dsconv_params[id(m._parameters[leaf])] = leaf
    for p in model.parameters():
        groups[dsconv_params.get(id(p), "other")].append(p)
    return groups


@torch.no_grad()
def freeze(model: nn.Module, scale_dtype: str | None = None) -> list[str]:
    """Turn every trainable DSConv layer of `model` back into an inference layer, in place;
    returns the names of the layers it froze.

    The trained integers clamp(round(latent / alpha)) go into the int8 `vqk` buffer, `kds`
    becomes a buffer holding the trained scales, `latent` is deleted. In eval mode the frozen
    model computes what the trainable one did. `scale_dtype` ("float16" or "float32") rounds
    the scales to the precision a saved file keeps (dsq.save refuses scales it would change);
    None keeps them as trained (float32).
    """
    dtype = None
    if scale_dtype is not None:
        from ..convert import scale_torch_dtype  # convert imports dsq.nn

        dtype = scale_torch_dtype(scale_dtype)
    scales = {}  # every layer's final scales, checked before any layer changes
    for name, m in _dsconv_layers(model):
        if trainable_mode(m) is None:
            continue
        kds = m.kds.detach().clone()
        if dtype is not None:
            stored = kds.to(dtype)
            if not bool(torch.isfinite(stored).all()):
                raise DsqError(f"layer {name!r}: a trained scale exceeds the {scale_dtype} range; "
                               "use scale dtype float32")
            kds = stored.to(kds.dtype)
        scales[name] = (m, kds)
    for m, kds in scales.values():
        kds_trained = m._parameters.pop("kds").detach()
        latent = m._parameters.pop(LATENT, None)
        if latent is not None:  # the codes of the scales trained with, as the forward computed them
            codes = latent_codes(latent, _scales(kds_trained, m.layout, latent.shape), m.weight_format.bits)
            m.vqk.copy_(codes.to(torch.int8))
        m.register_buffer("kds", kds)
        m._cache = None
    return list(scales)
