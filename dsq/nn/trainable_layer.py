"""The per-layer arithmetic of trainable DSConv layers: straight-through rounding of the VQK
and of BFP inputs, latent ("ste") and learned-rounding ("learned", AdaRound) weights, and which
of them a layer holds. dsq.nn.train makes whole models trainable and freezes them again.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..formats import ActFormat, BlockLayout, bfp_quantize
from ..formats.weights import code_range

WEIGHT_MODES = ("ste", "fixed", "learned")
LATENT = "latent"
ROUNDING = "rounding"  # "learned": AdaRound's V, one per weight
ROUNDING_BASE = "rounding_base"  # "learned": the lower of each weight's two codes (not in the state_dict)
ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch, as in AdaRound (Nagel et al. 2020)
BETA_START, BETA_END = 20.0, 2.0  # the rounding penalty's exponent, annealed over training
HALF_MARGIN = 1e-3  # an initial h(V) stays this far on the stored code's side of 1/2


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


def expanded_scales(kds: torch.Tensor, layout: BlockLayout, shape: torch.Size) -> torch.Tensor:
    """The KDS spread over the weight's `shape`: each weight's own scale."""
    return layout.expand_scales(kds).reshape(shape)


def ste_weight(latent: torch.Tensor, kds: torch.Tensor, layout: BlockLayout, bits: int) -> torch.Tensor:
    """alpha * clamp(round_ste(latent / alpha)): the weight of a weights="ste" layer."""
    scale = expanded_scales(kds, layout, latent.shape)
    return latent_codes(latent, scale, bits, ste=True) * scale


def rounding_up(rounding: torch.Tensor) -> torch.Tensor:
    """AdaRound's rectified sigmoid h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1): how
    far each weight rounds up, from 0 (down) to 1 (up); it reaches 0 and 1 at finite V."""
    return (torch.sigmoid(rounding) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def learned_codes(rounding: torch.Tensor, base: torch.Tensor, bits: int, hard: bool = False) -> torch.Tensor:
    """clamp(base + h(V), lo, hi) as floats; `hard` rounds h(V) to 0 or 1 (h >= 1/2 rounds up),
    as freeze does."""
    lo, hi = code_range(bits)
    up = rounding_up(rounding)
    return (base + (up >= 0.5).to(base.dtype) if hard else base + up).clamp(lo, hi)


def learned_weight(
    rounding: torch.Tensor, base: torch.Tensor, kds: torch.Tensor, layout: BlockLayout, bits: int
) -> torch.Tensor:
    """alpha * clamp(base + h(V), lo, hi): the weight of a weights="learned" layer."""
    return learned_codes(rounding, base, bits) * expanded_scales(kds, layout, base.shape)


def initial_rounding(
    reference: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, V) for weights="learned" from the float weight `reference`, the stored codes q and
    each weight's scale: a weight chooses between base and base + 1, namely q and q's neighbour
    on the side of reference / alpha (floor and ceil of reference / alpha where q is its nearest
    code); h(V) starts at reference / alpha's position between the two (AdaRound's start), kept
    on q's side of 1/2 so that rounding h(V) gives q back. Where alpha = 0, base = q."""
    zero = scale == 0
    ratio = torch.where(zero, codes, reference / torch.where(zero, torch.ones_like(scale), scale))
    upper = ratio < codes  # q is the upper code of the two
    base = codes - upper.to(codes.dtype)
    offset = ratio - base
    position = torch.where(upper, offset.clamp(0.5 + HALF_MARGIN, 1), offset.clamp(0, 0.5 - HALF_MARGIN))
    return base, -torch.log((ZETA - GAMMA) / (position - GAMMA) - 1)


def weight_parameter(layer: nn.Module) -> nn.Parameter | None:
    """The parameter a trainable layer's integers come from: `latent` ("ste"), `rounding`
    ("learned"), or None (the stored VQK)."""
    return layer._parameters.get(LATENT, layer._parameters.get(ROUNDING))


def trained_weight(layer: nn.Module) -> torch.Tensor:
    """The weight of an "ste" or "learned" layer, differentiable."""
    bits = layer.weight_format.bits
    if LATENT in layer._parameters:
        return ste_weight(layer.latent, layer.kds, layer.layout, bits)
    return learned_weight(layer.rounding, layer.rounding_base, layer.kds, layer.layout, bits)


def trainable_mode(layer: nn.Module) -> str | None:
    """ "ste", "fixed", "learned", or None for a DSConv layer that is not trainable (inference)."""
    if LATENT in layer._parameters:
        return "ste"
    if ROUNDING in layer._parameters:
        return "learned"
    return "fixed" if "kds" in layer._parameters else None
