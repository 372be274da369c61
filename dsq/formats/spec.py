"""The settings that define a DSConv format, checked once where they are made."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import DsqError
from .blocks import LAYOUTS

METHODS = ("l2", "kl")
MIN_BITS, MAX_BITS = 2, 8
# Refinement rounds after the paper's one-pass L2 fit. Chosen by measurement (README,
# "Choosing the defaults"): ResNet-20 / CIFAR-10 at 4 bits gains most of its accuracy
# back within a few rounds and nothing measurable after.
DEFAULT_ROUNDS = 5
# Weight of the slice-sum error in the L2 scale fit (formats.weights.sum_aware_scale): mu^2/s^2
# of a rectified standard Gaussian, the input a conv sees after BN + ReLU: 1 / (pi - 1).
DEFAULT_SUM_WEIGHT = round(1 / (math.pi - 1), 3)


def check_bits(bits: int, what: str = "weight bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise DsqError(f"{what} must be a whole number from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return bits


def check_block(block: int, what: str = "block size") -> int:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise DsqError(f"{what} must be a whole number of at least 1, got {block!r}")
    return block


@dataclass(frozen=True)
class WeightFormat:
    """How conv weights become VQK integers and KDS scales."""

    bits: int = 4
    block: int = 32
    method: str = "l2"
    rounds: int = DEFAULT_ROUNDS
    layout: str = "auto"
    sum_weight: float = DEFAULT_SUM_WEIGHT

    def __post_init__(self):
        check_bits(self.bits)
        check_block(self.block)
        if self.method not in METHODS:
            raise DsqError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 0:
            raise DsqError(f"refinement rounds must be a whole number >= 0, got {self.rounds!r}")
        if self.layout not in LAYOUTS:
            raise DsqError(f"unknown block layout {self.layout!r}: use one of {', '.join(LAYOUTS)}")
        if not isinstance(self.sum_weight, (int, float)) or not 0 <= self.sum_weight < math.inf:
            raise DsqError(f"sum weight must be a number >= 0, got {self.sum_weight!r}")


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
