"""The settings that define a DSConv format, checked once where they are made."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import DsqError
from ..finite import all_finite

CHANNEL = "channel"  # blocks along the input channels at each (out channel, tap)
FLAT = "flat"  # blocks along the flattened (in channels x taps) axis of each out channel
AUTO = "auto"  # flat for grouped/depthwise convs with fewer input channels per group than the block
LAYOUTS = (AUTO, CHANNEL, FLAT)
METHODS = ("l2", "kl")
MIN_BITS, MAX_BITS = 2, 8
# Refinement rounds after the paper's one-pass L2 fit. Chosen by measurement (README,
# "Choosing the defaults"): ResNet-20 / CIFAR-10 at 4 bits gains most of its accuracy
# back within a few rounds and nothing measurable after.
DEFAULT_ROUNDS = 5
# Weight of the slice-sum error in the L2 scale fit (formats.weights.sum_aware_scale): mu^2/s^2
# of a rectified standard Gaussian, the input a conv sees after BN + ReLU: 1 / (pi - 1).
DEFAULT_SUM_WEIGHT = round(1 / (math.pi - 1), 3)
# Beyond it the slice sum alone decides alpha (= sum(w) / sum(q)); the cap keeps the fit's float64
# sums finite for any float32 weight.
MAX_SUM_WEIGHT = 1e6
# How KDS scales are stored. A model from dsq.quantize already uses the rounded scales, so a saved
# file reloads bit-identical. float16 is dsq.quantize's default: over the 16 points of a ResNet-20
# sweep on all 10 000 CIFAR-10 test images (bits 2-8, blocks 8-64) it moved top-1 by -0.14 to +0.18
# points, +0.001 on average, against float32 (docs/file-format.md, "Scale precision").
SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
DEFAULT_SCALE_DTYPE = "float16"
# A WeightFormat built by hand keeps the fitted float32 scales as they are.
UNROUNDED_SCALE_DTYPE = "float32"


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_bits(bits: int, what: str = "weight bits") -> int:
    if not _is_whole(bits) or not MIN_BITS <= bits <= MAX_BITS:
        raise DsqError(f"{what} must be a whole number from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return bits


def check_block(block: int, what: str = "block size") -> int:
    if not _is_whole(block) or block < 1:
        raise DsqError(f"{what} must be a whole number of at least 1, got {block!r}")
    return block


def check_rounds(rounds: int) -> int:
    if not _is_whole(rounds) or rounds < 0:
        raise DsqError(f"refinement rounds must be a whole number >= 0, got {rounds!r}")
    return rounds


def check_sum_weight(sum_weight: float) -> float:
    if (
        isinstance(sum_weight, bool)
        or not isinstance(sum_weight, (int, float))
        or not 0 <= sum_weight <= MAX_SUM_WEIGHT
    ):
        raise DsqError(f"sum weight must be a number from 0 to {MAX_SUM_WEIGHT:g}, got {sum_weight!r}")
    return sum_weight


def scale_torch_dtype(scale_dtype: str) -> torch.dtype:
    """The torch dtype that the name `scale_dtype` stands for; DsqError when unknown."""
    if not isinstance(scale_dtype, str) or scale_dtype not in SCALE_DTYPES:
        raise DsqError(f"unknown scale dtype {scale_dtype!r}: use one of {', '.join(SCALE_DTYPES)}")
    return SCALE_DTYPES[scale_dtype]


def scale_bits(scale_dtype: str) -> int:
    """Bits of one stored KDS value: 16 or 32."""
    return scale_torch_dtype(scale_dtype).itemsize * 8


def round_scales(kds: torch.Tensor, scale_dtype: str, what: str) -> torch.Tensor:
    """`kds` rounded to `scale_dtype`, in its own dtype; DsqError naming `what` (e.g. "layer 'conv1'")
    when a scale is not finite there."""
    stored = kds.detach().to(scale_torch_dtype(scale_dtype))
    if not all_finite(stored):
        raise DsqError(f"{what}: a weight scale exceeds the {scale_dtype} range; use scale dtype float32")
    return stored.to(kds.dtype)


def check_layout(layout: str, allowed: tuple[str, ...] = LAYOUTS) -> str:
    if not isinstance(layout, str) or layout not in allowed:
        raise DsqError(f"unknown block layout {layout!r}: use one of {', '.join(allowed)}")
    return layout


@dataclass(frozen=True)
class WeightFormat:
    """How conv weights become VQK integers and KDS scales, and the dtype the scales are stored in."""

    bits: int = 4
    block: int = 32
    method: str = "l2"
    rounds: int = DEFAULT_ROUNDS
    layout: str = "auto"
    sum_weight: float = DEFAULT_SUM_WEIGHT
    scale_dtype: str = UNROUNDED_SCALE_DTYPE

    def __post_init__(self):
        check_bits(self.bits)
        check_block(self.block)
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise DsqError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        check_rounds(self.rounds)
        check_layout(self.layout)
        check_sum_weight(self.sum_weight)
        scale_torch_dtype(self.scale_dtype)


@dataclass(frozen=True)
class ActFormat:
    """Block floating point for conv inputs: `bits`-bit signed mantissas per `block` channels."""

    bits: int = 8
    block: int = 32

    def __post_init__(self):
        check_bits(self.bits, "activation mantissa bits")
        check_block(self.block, "activation block size")

    @property
    def label(self) -> str:
        """'bfp<bits>/<block>', as the per-layer tables name it."""
        return f"bfp{self.bits}/{self.block}"
