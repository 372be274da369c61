"""DSConv layers: drop-in replacements for nn.Conv2d (and nn.Linear) built from VQK + KDS + BFP."""
from .dsconv import BACKENDS, DSConv2d, DSConvMixin, DSLinear, dsconv_class, is_dsconv, layer_kind, set_backend, to_dsconv

__all__ = ["BACKENDS", "DSConv2d", "DSConvMixin", "DSLinear", "dsconv_class", "is_dsconv", "layer_kind", "set_backend",
           "to_dsconv"]
