"""Bit packing of b-bit two's-complement integers (VQK codes) into bytes, and back.

Code i takes bits [i*b, (i+1)*b) of one little-endian bit stream: stream bit k is bit
k % 8 (least significant first) of byte k // 8, and a code's own bits go in from its least
significant one. n codes take ceil(n*b/8) bytes; the unused high bits of the last byte are 0.
Both directions are vectorised: the only Python loop runs over the 8 codes of a group.
A conv weight's codes go in slice (KDS) order, the order of `BlockLayout.to_slices`, with
the zero padding of ragged blocks left out: each block's codes sit together.
"""

from __future__ import annotations

import math

import torch

from ..errors import DsqError
from .blocks import BlockLayout
from .spec import check_bits
from .weights import code_range


def packed_size(count: int, bits: int) -> int:
    """Bytes that `count` codes of `bits` bits take: ceil(count * bits / 8)."""
    return -(-count * bits // 8)


def _pad(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Flat `x` with zeros appended up to a multiple of `multiple` elements."""
    return torch.cat([x, x.new_zeros(-x.numel() % multiple)])


def _positions(bits: int) -> list[tuple[int, int]]:
    """(byte, shift) where each code of a group of 8 codes (= `bits` bytes) starts."""
    return [divmod(j * bits, 8) for j in range(8)]


def _checked_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`codes` flat as int16; DsqError unless every one is a whole number in the b-bit range
    (checked before any conversion, which would wrap or truncate)."""
    lo, hi = code_range(bits)
    codes = codes.detach().reshape(-1)
    fractional = codes.is_floating_point() and not bool((codes == codes.round()).all())  # NaN too
    if codes.dtype == torch.bool or codes.is_complex() or fractional:
        raise DsqError(
            "codes to pack must be whole numbers (integers, or floats without a fraction), "
            f"got {str(codes.dtype).removeprefix('torch.')} values that are not"
        )
    if codes.numel() and (codes.min().item() < lo or codes.max().item() > hi):
        raise DsqError(f"codes outside the {bits}-bit range [{lo}, {hi}] cannot be packed")
    return codes.to(torch.int16)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flat uint8 tensor of ceil(n*b/8) bytes holding the n codes of `codes` (any shape)."""
    check_bits(bits)
    codes = _checked_codes(codes, bits)
    groups = _pad(codes & ((1 << bits) - 1), 8).reshape(-1, 8).t()  # row j: code j of every group
    out = groups.new_zeros(bits + 1, groups.shape[1])  # row k: byte k; row `bits` takes an always-zero spill
    for j, (k, shift) in enumerate(_positions(bits)):
        out[k] |= groups[j] << shift
        out[k + 1] |= groups[j] >> (8 - shift)
    return (out[:bits] & 0xFF).to(torch.uint8).t().reshape(-1)[: packed_size(codes.numel(), bits)]


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first `count` codes (flat int8) of a `pack`ed uint8 tensor."""
    check_bits(bits)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise DsqError(f"the number of codes to unpack must be a whole number >= 0, got {count!r}")
    need = packed_size(count, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != need:
        raise DsqError(
            f"packed {bits}-bit codes need {need} uint8 bytes for {count} codes, "
            f"got {packed.numel()} {str(packed.dtype).removeprefix('torch.')} values"
        )
    rows = _pad(packed.to(torch.int16), bits).reshape(-1, bits).t()  # row k: byte k of every group
    rows = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
    mask, half = (1 << bits) - 1, 1 << (bits - 1)
    unsigned = torch.stack(
        [((rows[k] >> shift) | (rows[k + 1] << (8 - shift))) & mask for k, shift in _positions(bits)], dim=1
    ).reshape(-1)[:count]
    return ((unsigned ^ half) - half).to(torch.int8)  # sign-extend the b-bit two's complement


def pack_weight(vqk: torch.Tensor, layout: BlockLayout, bits: int) -> torch.Tensor:
    """A weight's codes packed in slice (KDS) order, block padding left out."""
    return pack(layout.to_slices(vqk.reshape(layout.shape))[layout.valid_mask()], bits)


def unpack_weight(packed: torch.Tensor, layout: BlockLayout, bits: int) -> torch.Tensor:
    """Inverse of `pack_weight`: int8 codes of the layout's (O, I, kh, kw) shape.

    With plain strides, as `quantize_weight` makes its VQK: convolutions pick their kernel, and so
    their rounding, by the weight's strides, and a reload must compute exactly what the quantized
    model computed.
    """
    codes = unpack(packed, bits, math.prod(layout.shape))  # checks the byte count before any allocation
    mask = layout.valid_mask()
    slices = torch.zeros(mask.shape, dtype=torch.int8).masked_scatter_(mask, codes)
    return layout.from_slices(slices).clone(memory_format=torch.contiguous_format)
