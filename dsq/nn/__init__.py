"""DSConv layers: drop-in replacements for nn.Conv2d (and nn.Linear) built from VQK + KDS + BFP."""
from .dsconv import DSConv2d, DSConvMixin, DSLinear, dsconv_class, is_dsconv, layer_kind, to_dsconv

__all__ = ["DSConv2d", "DSConvMixin", "DSLinear", "dsconv_class", "is_dsconv", "layer_kind", "to_dsconv"]
