"""Block floating point activations: one shared exponent per block of channels.

    e = floor(log2(max |x|)) over the block,  s = 2^(e - (m - 2)),
    mant = clamp(round(x / s), -(2^(m-1) - 1), 2^(m-1) - 1),  x ~= mant * s
"""
from __future__ import annotations

import torch

from .blocks import blocked, unblocked
from .spec import ActFormat


def _block_scales(xb: torch.Tensor, dim: int, bits: int) -> torch.Tensor:
    """Per-block power-of-two step s (keepdim over the block axis `dim`)."""
    peak = xb.abs().amax(dim=dim, keepdim=True)
    _, e = torch.frexp(peak)  # peak = f * 2^e with f in [0.5, 1): floor(log2 peak) = e - 1
    return torch.exp2((e - (bits - 1)).to(xb.dtype))


def bfp_encode(x: torch.Tensor, fmt: ActFormat, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer mantissas (int8, blocked view) and per-block steps s = 2^(e - (m - 2))."""
    xb = blocked(x, dim, fmt.block)
    step = _block_scales(xb, dim % x.dim() + 1, fmt.bits)
    lim = 2 ** (fmt.bits - 1) - 1
    mant = (xb / step).round_().clamp_(-lim, lim)
    return mant.to(torch.int8), step


def bfp_quantize(x: torch.Tensor, fmt: ActFormat, dim: int = 1) -> torch.Tensor:
    """x rounded to BFP and returned as floats (what the integer kernel computes with)."""
    d = dim % x.dim()
    # An axis no longer than the block is one block: no zero padding to compute (same result).
    xb = blocked(x, d, min(fmt.block, x.shape[d]))
    step = _block_scales(xb, d + 1, fmt.bits)
    lim = 2 ** (fmt.bits - 1) - 1
    out = (xb / step).round_().clamp_(-lim, lim).mul_(step)
    return unblocked(out, d, x.shape[d])
