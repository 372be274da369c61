"""The "exact" backend: the simulated arithmetic with every conv and linear in float64, rounded once.

The layer computes what the simulated backend computes, the dequantized weight alpha * q times the
BFP-rounded input, but in float64: alpha * q (a float32 times an integer of at most 8 bits) and the
BFP input (a mantissa of at most 8 bits times a power of two) are exact there, so is each product,
and the sums are float64; the result is rounded once to float32. That is the exactly rounded
output of the layer, which the int backend also computes, bit for bit (its units are summed in
float64 too), whereas the simulation's float32 sums depend on their order. Layers with a float
input (the image) are computed in float64 as well. Inference only, like int: set_backend refuses a
trainable model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats import dequantize
from .epilogue import Epilogue, take_output_epilogue
from .int_kernel import cpu_kernel_available
from .stand_in import StandInWeight


def exact_weight(layer) -> torch.Tensor:
    """The layer's alpha * q in float64, where it is exact."""
    return dequantize(layer.vqk, layer.kds.double(), layer.layout).reshape(layer.vqk.shape)


def _double(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.double()


def exact_conv2d(input, weight: "ExactWeight", bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """F.conv2d in float64 on the layer's exact alpha * q, rounded once to float32 by the layer's
    output epilogue (dsq.nn.epilogue; by default just the rounding)."""
    epilogue, residual = take_output_epilogue(weight.layer)
    out = F.conv2d(input.double(), exact_weight(weight.layer), _double(bias), stride, padding, dilation, groups)
    if _in_one_pass(out, epilogue, residual):
        return torch.ops.dsq.finish_f64(out, epilogue.scale, epilogue.shift, residual, epilogue.lo, epilogue.hi)
    return epilogue.apply(out, None, residual, channel_dim=-3)


def _in_one_pass(out: torch.Tensor, epilogue: Epilogue, residual: torch.Tensor | None) -> bool:
    """Whether dsq::finish_f64's C++ kernel takes the epilogue of this conv output (the same bit for
    bit as Epilogue.apply, in one pass instead of one per step): a dense CPU batch, float64 scales
    per channel, a residual of the output's shape and layout."""
    layout = torch.contiguous_format if out.is_contiguous() else torch.channels_last
    dense = out.is_contiguous(memory_format=layout)
    per_channel = epilogue.scale is None or (
        epilogue.scale.dtype == epilogue.shift.dtype == torch.float64
        and epilogue.scale.is_contiguous()
        and epilogue.shift.is_contiguous()
        and epilogue.scale.numel() == epilogue.shift.numel() == out.shape[1]
    )
    laid_out = residual is None or (
        residual.dtype == torch.float32 and residual.shape == out.shape and residual.is_contiguous(memory_format=layout)
    )
    return out.dim() == 4 and out.device.type == "cpu" and dense and per_channel and laid_out and cpu_kernel_available()


def exact_linear(input, weight: "ExactWeight", bias=None) -> torch.Tensor:
    """F.linear in float64 on the layer's exact alpha * q, rounded once to float32 by the layer's
    output epilogue."""
    epilogue, residual = take_output_epilogue(weight.layer)
    out = F.linear(input.double(), exact_weight(weight.layer), _double(bias))
    return epilogue.apply(out, None, residual, channel_dim=-1)


class ExactWeight(StandInWeight):
    """A DSConv layer's `weight` under the exact backend (and under int where the input is float):
    F.conv2d or F.linear called with it run `exact_conv2d` / `exact_linear`; any other use sees
    the dequantized weight alpha * q."""

    kernels = {F.conv2d: exact_conv2d, F.linear: exact_linear}
