"""DSConv layers as exporters see them: the dequantization and the BFP rounding as two opaque
torch ops, `dsq::block_dequantize` and `dsq::bfp`, each with one ONNX meaning.

`block_dequantize(codes, scales, block)` is ONNX's blocked `DequantizeLinear(axis=1,
block_size=block)`: codes (O, L, ...) times scales (O, ceil(L / block), ...) repeated `block`
times along axis 1. `bfp(x, bits, block)` is dsq's BFP rounding along axis 1 (method §3), the
`dsq.BFP` function of an exported graph. Both run dsq's own math when called (eager, and while
torch.export traces with fake tensors); `export_layers` makes every DSConv layer of a model
call them for the length of a `with` block.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import DsqError
from ..formats import CHANNEL, ActFormat, bfp_quantize
from ..nn import frozen_layers


@torch.library.custom_op("dsq::block_dequantize", mutates_args=())
def block_dequantize(codes: Tensor, scales: Tensor, block: int, bits: int, layer: str) -> Tensor:
    """codes * scales, each scale repeated `block` times along axis 1 (the last block may be short);
    `bits` and `layer` (the layer's name) only travel to the exported graph."""
    return codes.to(scales.dtype) * scales.repeat_interleave(block, 1).narrow(1, 0, codes.shape[1])


@block_dequantize.register_fake
def _(codes: Tensor, scales: Tensor, block: int, bits: int, layer: str) -> Tensor:
    return codes.new_empty(codes.shape, dtype=scales.dtype)


@torch.library.custom_op("dsq::bfp", mutates_args=())
def bfp(x: Tensor, bits: int, block: int) -> Tensor:
    """x rounded to block floating point along axis 1 (dsq.formats.bfp_quantize)."""
    return bfp_quantize(x, ActFormat(bits, block), 1)


@bfp.register_fake
def _(x: Tensor, bits: int, block: int) -> Tensor:
    return torch.empty_like(x)


class ExportedLayer:
    """Mixed in front of a DSConv class while exporting: the weight is `block_dequantize` of
    the stored codes and scales, the input goes through `bfp` (unless weights only)."""

    weights_only = False
    export_name = ""

    @property
    def weight(self) -> Tensor:
        o = self.vqk.shape[0]
        nb = self.layout.scale_shape[1]
        if self.layout.kind == CHANNEL and self.vqk.dim() == 4:  # blocks along I at each tap
            codes, scales = self.vqk, self.kds
        else:  # flat blocks over (I x taps), and linear weights: one 2-D blocked axis
            codes, scales = self.vqk.reshape(o, -1), self.kds.reshape(o, nb)
        return torch.ops.dsq.block_dequantize(
            codes, scales, self.layout.width, self.weight_format.bits, self.export_name
        ).reshape(self.vqk.shape)

    @property
    def runs_int(self) -> bool:
        return False

    def quantize_input(self, x: Tensor) -> Tensor:
        act = self.act_format
        if act is None or self.weights_only:
            return x
        if self.act_dim % x.dim() != 1:
            raise DsqError(
                f"a {type(self).__name__} input of shape {tuple(x.shape)} has its BFP blocks on axis "
                f"{self.act_dim % x.dim()}; export handles blocks on axis 1 (conv inputs, linear inputs (N, F))"
            )
        return torch.ops.dsq.bfp(x, act.bits, act.block)


_CLASSES: dict[type, type] = {}


def _exported_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Exported{cls.__name__}", (ExportedLayer, cls), {"__module__": __name__})
    return _CLASSES[cls]


@contextlib.contextmanager
def export_layers(model: nn.Module, weights_only: bool = False):
    """Within the block, every DSConv layer of `model` computes through the two export ops
    (BFP left out with `weights_only`); yields the (name, layer) pairs. DsqError for a model
    without DSConv layers or a trainable one."""
    layers = frozen_layers(model, "exporting it")
    classes = [type(m) for _, m in layers]
    try:
        for name, m in layers:
            m.__class__ = _exported_class(type(m))
            m.weights_only, m.export_name = weights_only, name
        yield layers
    finally:
        for (_, m), cls in zip(layers, classes):
            m.__class__ = cls
            del m.weights_only, m.export_name
