"""Block layouts: how a tensor axis is cut into blocks that share one scale or exponent.

One helper serves weights, activations, packing and the integer kernel alike:
`blocked` splits an axis into (n_blocks, block) with a zero-padded ragged last block,
`unblocked` undoes it. Zero padding never counts: it has no magnitude and rounds to 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import DsqError

CHANNEL = "channel"  # blocks along the input channels at each (out channel, tap)
FLAT = "flat"  # blocks along the flattened (in channels x taps) axis of each out channel
AUTO = "auto"  # flat for grouped/depthwise convs with fewer input channels per group than the block
LAYOUTS = (AUTO, CHANNEL, FLAT)


def n_blocks(length: int, block: int) -> int:
    """How many blocks of `block` cover `length` elements (the last one may be short)."""
    return -(-length // block)


def blocked(x: torch.Tensor, dim: int, block: int) -> torch.Tensor:
    """View `x` with axis `dim` split into (n_blocks, block), zero-padding the last block."""
    dim %= x.dim()
    length = x.shape[dim]
    pad = n_blocks(length, block) * block - length
    if pad:
        x = F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [0, pad])
    return x.unflatten(dim, (-1, block))


def unblocked(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """Inverse of `blocked`: merge axes (dim, dim + 1) and drop the padding."""
    dim %= x.dim()
    return x.flatten(dim, dim + 1).narrow(dim, 0, length)


def resolve_layout(layout: str, in_per_group: int, block: int, groups: int = 1) -> str:
    """The concrete layout (channel or flat) that `layout` means for this weight."""
    if layout not in LAYOUTS:
        raise DsqError(f"unknown block layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    if layout == AUTO:
        return FLAT if groups > 1 and in_per_group < block else CHANNEL
    return layout


@dataclass(frozen=True)
class BlockLayout:
    """How a weight of `shape` (O, I, kh, kw) is cut into slices of up to `block` numbers."""

    kind: str
    block: int
    shape: tuple[int, int, int, int]

    @property
    def axis_length(self) -> int:
        """Length of the axis that is cut into blocks."""
        _, i, kh, kw = self.shape
        return i if self.kind == CHANNEL else i * kh * kw

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
        if self.kind == CHANNEL:  # (O, kh, kw, nb, B)
            return blocked(w.permute(0, 2, 3, 1), 3, self.block)
        return blocked(w.reshape(o, i * kh * kw), 1, self.block)  # (O, nb, B)

    def to_slices(self, w: torch.Tensor) -> torch.Tensor:
        """(n_slices, block) rows in KDS order, zero-padded where a block is ragged."""
        b = self._blocked_weight(w)
        if self.kind == CHANNEL:
            b = b.permute(0, 3, 1, 2, 4)  # (O, nb, kh, kw, B): KDS order
        return b.reshape(-1, self.block)

    def valid_mask(self) -> torch.Tensor:
        """(n_slices, block) bool: True where a slice entry is a real weight, not padding."""
        return self.to_slices(torch.ones(self.shape, dtype=torch.bool))

    def from_slices(self, s: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_slices`: the weight-shaped tensor."""
        o, i, kh, kw = self.shape
        if self.kind == CHANNEL:
            nb = self.scale_shape[1]
            b = s.reshape(o, nb, kh, kw, self.block).permute(0, 2, 3, 1, 4)
            return unblocked(b, 3, i).permute(0, 3, 1, 2)
        return unblocked(s.reshape(o, -1, self.block), 1, i * kh * kw).reshape(self.shape)

    def expand_scales(self, kds: torch.Tensor) -> torch.Tensor:
        """Each weight's own scale, broadcast from the KDS to the weight's shape."""
        o, i, kh, kw = self.shape
        if self.kind == CHANNEL:
            return kds.repeat_interleave(self.block, dim=1)[:, :i]
        return kds.repeat_interleave(self.block, dim=1)[:, : i * kh * kw].reshape(self.shape)
