"""Block layouts: how a tensor axis is cut into blocks that share one scale or exponent.

One helper serves weights, activations, packing and the integer kernel alike:
`blocked` splits an axis into (n_blocks, width) with a zero-padded ragged last block,
`unblocked` undoes it. Zero padding never counts: it has no magnitude and rounds to 0.
A block longer than the axis is the whole axis: one block, as wide as the axis, whatever
the block size (so a huge block costs no memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import DsqError
from .spec import AUTO, CHANNEL, FLAT, LAYOUTS, check_block, check_layout

__all__ = [
    "AUTO",
    "CHANNEL",
    "FLAT",
    "LAYOUTS",
    "BlockLayout",
    "blocked",
    "block_width",
    "n_blocks",
    "resolve_layout",
    "unblocked",
]


def n_blocks(length: int, block: int) -> int:
    """How many blocks of `block` cover `length` elements (the last one may be short). No negative
    floor division: torch's TorchScript-based ONNX exporter, tracing `length` as a size, turns it into
    a truncating one, which lost the ragged last block (docs/yolo.md)."""
    return (length + block - 1) // block


def block_width(length: int, block: int) -> int:
    """Numbers per block as stored: `block`, or the whole axis when it is shorter (at least 1)."""
    return min(check_block(block), max(length, 1))


def blocked(x: torch.Tensor, dim: int, block: int) -> torch.Tensor:
    """View `x` with axis `dim` split into (n_blocks, block_width), zero-padding the last block."""
    dim %= x.dim()
    length = x.shape[dim]
    width = block_width(length, block)
    pad = n_blocks(length, width) * width - length
    if pad:
        x = F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [0, pad])
    return x.unflatten(dim, (-1, width))


def unblocked(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """Inverse of `blocked`: merge axes (dim, dim + 1) and drop the padding."""
    dim %= x.dim()
    return x.flatten(dim, dim + 1).narrow(dim, 0, length)


def resolve_layout(layout: str, in_per_group: int, block: int, groups: int = 1) -> str:
    """The concrete layout (channel or flat) that `layout` means for this weight."""
    if check_layout(layout) == AUTO:
        return FLAT if groups > 1 and in_per_group < block else CHANNEL
    return layout


def _check_shape(shape) -> tuple[int, int, int, int]:
    """`shape` as a tuple of 4 whole numbers >= 0; DsqError otherwise."""
    dims = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else ()
    if len(dims) != 4 or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise DsqError(f"a block layout needs a weight shape of 4 whole numbers >= 0 (O, I, kh, kw), got {shape!r}")
    return dims


@dataclass(frozen=True)
class BlockLayout:
    """How a weight of `shape` (O, I, kh, kw) is cut into slices of up to `block` numbers."""

    kind: str
    block: int
    shape: tuple[int, int, int, int]

    def __post_init__(self):
        check_layout(self.kind, (CHANNEL, FLAT))
        check_block(self.block)
        object.__setattr__(self, "shape", _check_shape(self.shape))

    @property
    def axis_length(self) -> int:
        """Length of the axis that is cut into blocks."""
        _, i, kh, kw = self.shape
        return i if self.kind == CHANNEL else i * kh * kw

    @property
    def width(self) -> int:
        """Numbers per slice as stored (`block_width`): the block, or the whole axis when shorter."""
        return block_width(self.axis_length, self.block)

    @property
    def scale_shape(self) -> tuple[int, ...]:
        """Shape of the KDS: (O, nb, kh, kw) for channel blocks, (O, nb) for flat ones."""
        o, _, kh, kw = self.shape
        nb = n_blocks(self.axis_length, self.block)
        return (o, nb, kh, kw) if self.kind == CHANNEL else (o, nb)

    @property
    def n_slices(self) -> int:
        return int(torch.Size(self.scale_shape).numel())

    def _blocked_weight(self, w: torch.Tensor) -> torch.Tensor:
        o, i, kh, kw = self.shape
        if self.kind == CHANNEL:  # (O, kh, kw, nb, width)
            return blocked(w.permute(0, 2, 3, 1), 3, self.block)
        return blocked(w.reshape(o, i * kh * kw), 1, self.block)  # (O, nb, width)

    def to_slices(self, w: torch.Tensor) -> torch.Tensor:
        """(n_slices, width) rows in KDS order, zero-padded where a block is ragged."""
        b = self._blocked_weight(w)
        if self.kind == CHANNEL:
            b = b.permute(0, 3, 1, 2, 4)  # (O, nb, kh, kw, width): KDS order
        return b.reshape(-1, self.width)

    def valid_mask(self) -> torch.Tensor:
        """(n_slices, width) bool: True where a slice entry is a real weight, not padding."""
        return self.to_slices(torch.ones(self.shape, dtype=torch.bool))

    def from_slices(self, s: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_slices`: the weight-shaped tensor."""
        o, i, kh, kw = self.shape
        nb = self.scale_shape[1]
        if self.kind == CHANNEL:
            b = s.reshape(o, nb, kh, kw, self.width).permute(0, 2, 3, 1, 4)
            return unblocked(b, 3, i).permute(0, 3, 1, 2)
        return unblocked(s.reshape(o, nb, self.width), 1, i * kh * kw).reshape(self.shape)

    def expand_scales(self, kds: torch.Tensor) -> torch.Tensor:
        """Each weight's own scale, broadcast from the KDS to the weight's shape."""
        o, i, kh, kw = self.shape
        if self.kind == CHANNEL:
            return kds.repeat_interleave(self.width, dim=1)[:, :i]
        return kds.repeat_interleave(self.width, dim=1)[:, : i * kh * kw].reshape(self.shape)
