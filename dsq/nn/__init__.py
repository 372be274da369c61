"""DSConv layers: drop-in replacements for nn.Conv2d (and nn.Linear) built from VQK + KDS + BFP."""

from .dsconv import (
    BACKENDS,
    DSConv2d,
    DSConvMixin,
    DSLinear,
    check_backend,
    dsconv_class,
    is_dsconv,
    layer_kind,
    set_backend,
    to_dsconv,
)
from .fused import fuse_int
from .int_plan import INT_KERNELS
from .train import WEIGHT_MODES, freeze, frozen_layers, is_trainable, make_trainable, parameter_groups

__all__ = [
    "BACKENDS",
    "INT_KERNELS",
    "DSConv2d",
    "check_backend",
    "DSConvMixin",
    "DSLinear",
    "dsconv_class",
    "is_dsconv",
    "layer_kind",
    "set_backend",
    "to_dsconv",
    "WEIGHT_MODES",
    "make_trainable",
    "freeze",
    "fuse_int",
    "frozen_layers",
    "is_trainable",
    "parameter_groups",
]
