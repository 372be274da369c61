"""Pure tensor math of DSConv: block layouts, VQK/KDS fitting, BFP activations, bit packing."""
from .bfp import bfp_encode, bfp_quantize
from .blocks import AUTO, CHANNEL, FLAT, LAYOUTS, BlockLayout, blocked, unblocked
from .packing import pack, pack_weight, packed_size, unpack, unpack_weight
from .spec import DEFAULT_ROUNDS, DEFAULT_SUM_WEIGHT, METHODS, ActFormat, WeightFormat
from .weights import QuantizedWeight, dequantize, fit_kl, fit_l2, quantize_weight

__all__ = [
    "AUTO", "CHANNEL", "FLAT", "LAYOUTS", "METHODS", "DEFAULT_ROUNDS", "DEFAULT_SUM_WEIGHT",
    "ActFormat", "WeightFormat", "BlockLayout", "QuantizedWeight",
    "blocked", "unblocked", "bfp_encode", "bfp_quantize",
    "fit_l2", "fit_kl", "quantize_weight", "dequantize",
    "pack", "unpack", "packed_size", "pack_weight", "unpack_weight",
]
