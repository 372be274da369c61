"""Block floating point activations: one shared exponent per block of channels.

    e = floor(log2(max |x|)) over the block,  s = 2^(e - (m - 2)),
    mant = clamp(round(x / s), -(2^(m-1) - 1), 2^(m-1) - 1),  x ~= mant * s

A step below the dtype's smallest subnormal is raised to it: every float of that dtype is a
whole multiple of it, so such a block keeps its values exactly, as the formula does, and no
step underflows to 0 (0 / 0 would give NaN).
"""

from __future__ import annotations

import torch

from ..errors import DsqError
from .blocks import blocked, unblocked
from .spec import ActFormat


def floor_log2(peak: torch.Tensor) -> torch.Tensor:
    """floor(log2(peak)) for finite peak > 0, exactly, as floats, with ops that every exporter knows
    (torch.export, both torch.onnx exporters, ONNX itself: no frexp, no exp2). log2 may round
    across a power of two either way; one comparison each way against the exact 2^e puts it back."""
    e = torch.floor(torch.log2(peak))
    e = e - (torch.pow(2.0, e) > peak).to(e.dtype)
    return e + (torch.pow(2.0, e + 1) <= peak).to(e.dtype)


def _block_scales(xb: torch.Tensor, dim: int, bits: int) -> torch.Tensor:
    """Per-block power-of-two step s (keepdim over the block axis `dim`); a block of zeros (or of
    NaN or infinity) takes e = -1."""
    if not xb.is_floating_point():
        raise DsqError(f"block floating point needs float activations, got {str(xb.dtype).removeprefix('torch.')}")
    peak = xb.abs().amax(dim=dim, keepdim=True)
    e = floor_log2(peak).where(torch.isfinite(peak) & (peak > 0), -1.0)
    finfo = torch.finfo(xb.dtype)
    return torch.pow(2.0, e - (bits - 2)).clamp_min_(finfo.smallest_normal * finfo.eps)


def _mantissas(x: torch.Tensor, fmt: ActFormat, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float-valued mantissas (blocked view along `dim`, already wrapped) and per-block steps."""
    xb = blocked(x, dim, fmt.block)
    step = _block_scales(xb, dim + 1, fmt.bits)
    lim = 2 ** (fmt.bits - 1) - 1
    return (xb / step).round_().clamp_(-lim, lim), step


def bfp_encode(x: torch.Tensor, fmt: ActFormat, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer mantissas (int8, blocked view) and per-block steps s = 2^(e - (m - 2))."""
    mant, step = _mantissas(x, fmt, dim % x.dim())
    return mant.to(torch.int8), step


def bfp_quantize(x: torch.Tensor, fmt: ActFormat, dim: int = 1) -> torch.Tensor:
    """x rounded to BFP and returned as floats (what the integer kernel computes with)."""
    d = dim % x.dim()
    mant, step = _mantissas(x, fmt, d)
    return unblocked(mant.mul_(step), d, x.shape[d])
