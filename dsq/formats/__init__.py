"""Pure tensor math of DSConv: block layouts, VQK/KDS fitting, BFP activations."""
from .bfp import bfp_encode, bfp_quantize
from .blocks import AUTO, CHANNEL, FLAT, LAYOUTS, BlockLayout, blocked, unblocked
from .spec import DEFAULT_ROUNDS, METHODS, ActFormat, WeightFormat
from .weights import QuantizedWeight, dequantize, fit_kl, fit_l2, quantize_weight

__all__ = [
    "AUTO", "CHANNEL", "FLAT", "LAYOUTS", "METHODS", "DEFAULT_ROUNDS",
    "ActFormat", "WeightFormat", "BlockLayout", "QuantizedWeight",
    "blocked", "unblocked", "bfp_encode", "bfp_quantize",
    "fit_l2", "fit_kl", "quantize_weight", "dequantize",
]
