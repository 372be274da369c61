"""DSConv layers that train: straight-through gradients through the VQK rounding and BFP.

    make_trainable(model)   every DSConv layer's KDS becomes an nn.Parameter `kds`; with
                            weights="ste" a float `latent` weight (initialised to alpha * q)
                            is added and the integers are re-derived from it every forward:
                                w = alpha * clamp(round_ste(latent / alpha), lo, hi)
                            (rounding with an identity gradient, so latent and alpha both get
                            gradients, LSQ-style); with weights="fixed" the VQK stays put; with
                            weights="learned" (AdaRound) each weight learns whether to round
                            down or up (a float `rounding` V per weight, h(V) in [0, 1]):
                                w = alpha * clamp(base + h(V), lo, hi)
    freeze(model)           the trained integers back into the int8 `vqk` buffer, `kds` back
                            to a buffer, `latent` / `rounding` gone: an inference model again.

BFP inputs pass gradients straight through (DSConvMixin.quantize_input); see docs/training.md.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import DsqError
from ..formats import round_scales
from .dsconv import is_dsconv
from .trainable_layer import (
    BETA_END,
    BETA_START,
    LATENT,
    ROUNDING,
    ROUNDING_BASE,
    WEIGHT_MODES,
    expanded_scales,
    initial_rounding,
    latent_codes,
    learned_codes,
    rounding_up,
    trainable_mode,
)


def rounding_penalty(model: nn.Module, progress: float) -> torch.Tensor:
    """AdaRound's regulariser mean(1 - |2 h(V) - 1|^beta) over every learned rounding of `model`
    (0 once each h is 0 or 1), beta annealed from 20 at progress 0 to 2 at progress 1: it pushes
    each h towards the nearer of 0 and 1, first only those already close to one."""
    beta = BETA_START + (BETA_END - BETA_START) * progress
    roundings = [m._parameters[ROUNDING] for _, m in _dsconv_layers(model) if ROUNDING in m._parameters]
    if not roundings:
        raise DsqError("the model has no learned roundings: make_trainable(model, weights='learned') first")
    total = sum((1 - (2 * rounding_up(v) - 1).abs().pow(beta)).sum() for v in roundings)
    return total / sum(v.numel() for v in roundings)


def is_trainable(model: nn.Module) -> bool:
    """Whether any DSConv layer of `model` is trainable (not frozen)."""
    return any(is_dsconv(m) and trainable_mode(m) for m in model.modules())


def _dsconv_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = [(name, m) for name, m in model.named_modules() if is_dsconv(m)]
    if not layers:
        raise DsqError("the model has no DSConv layers: quantize it first (dsq.quantize) or build it with DSConv2d")
    return layers


def frozen_layers(model: nn.Module, action: str) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every DSConv layer of `model`, for `action` (e.g. "exporting it") that
    needs them frozen; DsqError when there is none or the model is trainable."""
    layers = _dsconv_layers(model)
    if any(trainable_mode(m) for _, m in layers):
        raise DsqError(f"the model is trainable (dsq.nn.make_trainable): dsq.nn.freeze(model) before {action}")
    return layers


def _qualified(name: str, leaf: str) -> str:
    return f"{name}.{leaf}" if name else leaf


def make_trainable(
    model: nn.Module, weights: str = "ste", reference: nn.Module | None = None
) -> dict[str, nn.Parameter]:
    """Make every DSConv layer of `model` trainable, in place; returns the new parameters by
    their qualified names ("<layer>.kds", "<layer>.latent", "<layer>.rounding"), in module order.

    weights="ste": each layer gets a float `latent` weight (initialised to alpha * q, so the
    output does not change) and computes alpha * clamp(round(latent / alpha)) with
    straight-through rounding; gradients reach `latent` and `kds`. weights="fixed": the VQK
    integers stay, only `kds` learns. weights="learned" (AdaRound): each weight learns to round
    down or up, w = alpha * clamp(base + h(V), lo, hi) with a float parameter `rounding` (V) per
    weight, started from the float weights of `reference` (the float model `model` was quantized
    from, same layer names; see initial_rounding); the forward uses the relaxed h(V) in [0, 1],
    so the output changes at once, and freeze rounds it. Every mode makes the KDS the float32
    nn.Parameter `kds` (the state_dict keeps its keys, plus `latent` or `rounding`), BFP inputs
    pass gradients straight through, and the model's other parameters (biases, BatchNorm) are
    left as they are. Calling it again with the same `weights` changes nothing. `freeze` undoes it.

    Args:
        model: a model with DSConv layers on the simulate backend, changed in place.
        weights: "ste", "fixed" or "learned" (WEIGHT_MODES).
        reference: the float model `model` was quantized from; needed by "learned" only.

    Returns:
        The new trainable parameters by qualified name, e.g. for an optimizer. DsqError for an
        unknown mode, a model without DSConv layers, a layer on the int or exact backend, a
        layer already trainable in another mode, and "learned" without a fitting `reference`.

    Example:
        >>> import torch, torch.nn as nn
        >>> from dsq.nn import DSConv2d, make_trainable
        >>> model = nn.Sequential(DSConv2d(8, 4, 1))
        >>> x = torch.randn(1, 8, 5, 5)
        >>> before = model(x)
        >>> list(make_trainable(model, weights="ste"))
        ['0.kds', '0.latent']
        >>> torch.equal(model(x), before)
        True
    """
    if weights not in WEIGHT_MODES:
        raise DsqError(f"unknown weights mode {weights!r}: use one of {', '.join(WEIGHT_MODES)}")
    layers = _dsconv_layers(model)
    for name, m in layers:
        if m.backend != "simulate":
            raise DsqError(
                f"layer {name!r} runs the {m.backend} backend, which has no gradient: "
                "dsq.nn.set_backend(model, 'simulate') before make_trainable"
            )
        mode = trainable_mode(m)
        if mode not in (None, weights):
            raise DsqError(
                f"layer {name!r} is already trainable with weights={mode!r}: "
                f"dsq.nn.freeze(model) before make_trainable(weights={weights!r})"
            )
    references = _reference_weights(layers, reference) if weights == "learned" else {}
    params = {}
    for name, m in layers:
        if trainable_mode(m) is None:
            kds = m._buffers.pop("kds").detach().float().clone()
            scales = expanded_scales(kds, m.layout, m.vqk.shape)
            if weights == "ste":
                m.register_parameter(LATENT, nn.Parameter(m.vqk.float() * scales))
            elif weights == "learned":
                base, rounding = initial_rounding(references[name], m.vqk.float(), scales)
                m.register_buffer(ROUNDING_BASE, base, persistent=False)
                m.register_parameter(ROUNDING, nn.Parameter(rounding))
            m.register_parameter("kds", nn.Parameter(kds))
            m._cache = None
        for leaf in ("kds", LATENT, ROUNDING):
            if leaf in m._parameters:
                params[_qualified(name, leaf)] = m._parameters[leaf]
    return params


def _reference_weights(layers: list[tuple[str, nn.Module]], reference: nn.Module | None) -> dict[str, torch.Tensor]:
    """Each DSConv layer's float weight in `reference`, by layer name, float32 on the layer's device."""
    if reference is None:
        raise DsqError(
            "weights='learned' starts from the float weights: pass the float model "
            "the DSConv model was quantized from (make_trainable(..., reference=float_model))"
        )
    weights = {}
    for name, m in layers:
        try:
            weight = reference.get_submodule(name).weight
        except AttributeError:
            raise DsqError(
                f"the reference model has no layer {name!r} with a weight: pass the float model "
                "the DSConv model was quantized from"
            ) from None
        if weight.numel() != m.vqk.numel():
            raise DsqError(
                f"layer {name!r}: the reference weight has shape {tuple(weight.shape)}, "
                f"the DSConv layer {tuple(m.vqk.shape)}"
            )
        weights[name] = weight.detach().float().reshape(m.vqk.shape).to(m.vqk.device)
    return weights


def parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The model's parameters in four groups, e.g. for optimizer groups with their own rates:
    "latent" (the STE latent weights), "rounding" (the learned roundings), "kds" (the DSConv
    scales), "other" (biases, BatchNorm, layers left float)."""
    leaves = (LATENT, ROUNDING, "kds")
    groups: dict[str, list[nn.Parameter]] = {leaf: [] for leaf in (*leaves, "other")}
    dsconv_params = {}
    for _, m in _dsconv_layers(model):
        for leaf in leaves:
            if leaf in m._parameters:
                dsconv_params[id(m._parameters[leaf])] = leaf
    for p in model.parameters():
        groups[dsconv_params.get(id(p), "other")].append(p)
    return groups


@torch.no_grad()
def freeze(model: nn.Module) -> list[str]:
    """Turn every trainable DSConv layer of `model` back into an inference layer, in place;
    returns the names of the layers it froze.

    The trained integers go into the int8 `vqk` buffer: clamp(round(latent / alpha)) ("ste"),
    clamp(base + 1{h(V) >= 1/2}) ("learned": each rounding decided); `kds` becomes a buffer
    holding the trained scales rounded to each layer's `weight_format.scale_dtype` (the precision
    a saved file keeps; DsqError, and no layer changed, when a scale exceeds it); `latent` /
    `rounding` are deleted. In eval mode the frozen model computes what the trainable one did
    ("learned": with every h(V) rounded to 0 or 1), with the rounded scales.

    Args:
        model: a model with DSConv layers (trainable or not), changed in place.

    Returns:
        The names of the layers that were trainable and are now frozen (empty if none was).
        DsqError for a model without DSConv layers, or a trained scale beyond its scale dtype.

    Example:
        >>> import torch.nn as nn
        >>> from dsq.nn import DSConv2d, freeze, make_trainable
        >>> model = nn.Sequential(DSConv2d(8, 4, 1))
        >>> _ = make_trainable(model)
        >>> freeze(model)
        ['0']
    """
    scales = {}  # every layer's final scales, checked before any layer changes
    for name, m in _dsconv_layers(model):
        if trainable_mode(m) is not None:
            scales[name] = (m, round_scales(m.kds.detach().clone(), m.weight_format.scale_dtype, f"layer {name!r}"))
    for m, kds in scales.values():
        if trainable_mode(m) == "ste":  # the codes of the scales trained with, as the forward computed them
            codes = latent_codes(m.latent, expanded_scales(m.kds, m.layout, m.vqk.shape), m.weight_format.bits)
            m.vqk.copy_(codes.to(torch.int8))
        elif trainable_mode(m) == "learned":
            m.vqk.copy_(learned_codes(m.rounding, m.rounding_base, m.weight_format.bits, hard=True).to(torch.int8))
        for leaf in ("kds", LATENT, ROUNDING):
            m._parameters.pop(leaf, None)
        m._buffers.pop(ROUNDING_BASE, None)
        m.register_buffer("kds", kds)
        m._cache = None
    return list(scales)
