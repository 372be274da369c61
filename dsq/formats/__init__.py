"""Pure tensor math of DSConv: block layouts, VQK/KDS fitting, BFP activations, bit packing."""

from .bfp import bfp_encode, bfp_quantize
from .blocks import AUTO, CHANNEL, FLAT, LAYOUTS, BlockLayout, blocked, unblocked
from .packing import pack, pack_weight, packed_size, unpack, unpack_weight
from .spec import (
    DEFAULT_ROUNDS,
    DEFAULT_SCALE_DTYPE,
    DEFAULT_SUM_WEIGHT,
    METHODS,
    SCALE_DTYPES,
    ActFormat,
    WeightFormat,
    round_scales,
    scale_bits,
    scale_torch_dtype,
)
from .weights import QuantizedWeight, dequantize, fit_kl, fit_l2, quantize_weight

__all__ = [
    "AUTO",
    "CHANNEL",
    "FLAT",
    "LAYOUTS",
    "METHODS",
    "DEFAULT_ROUNDS",
    "DEFAULT_SUM_WEIGHT",
    "DEFAULT_SCALE_DTYPE",
    "SCALE_DTYPES",
    "ActFormat",
    "WeightFormat",
    "round_scales",
    "scale_bits",
    "scale_torch_dtype",
    "BlockLayout",
    "QuantizedWeight",
    "blocked",
    "unblocked",
    "bfp_encode",
    "bfp_quantize",
    "fit_l2",
    "fit_kl",
    "quantize_weight",
    "dequantize",
    "pack",
    "unpack",
    "packed_size",
    "pack_weight",
    "unpack_weight",
]
