"""The "int" backend: DSConv layers computed with integer dot products (docs/method.md §5).

    out[o, p] = sum over units u of  alpha_u[o] * step_u[p] * sum_c q[o, c, tap_u] * mant[c, p + tap_u]

A *unit* is one kernel tap and one run of input channels (within a group) over which both the
weight block (one KDS value alpha) and the activation block (one BFP step, a power of two) stay
the same. The inner sum multiplies the int8 VQK with the int8 BFP mantissas and adds in int32,
exactly; only one float multiply-add per unit and output remains. With the channel layout and
activation blocks aligned to the weight blocks, the units are the KDS slices (block, tap); the
flat layout (blocks over in-channels x taps) is cut at every tap too, because the activation
exponent changes from one position to the next.

A layer's plan (dsq.nn.int_plan: its units, and its weights packed for the kernel) is built once;
this module runs it on each input, in one of two ways:

- the op dsq::int_conv (dsq.nn.int_kernel; on the CPU its C++ kernel in dsq/nn/csrc/int_conv.cpp)
  runs ungrouped convs and linear layers whose weights have the channel layout and whose
  activation blocks match the weight blocks (ResNets, the 1x1 convs of MobileNets): a direct
  convolution, no im2col, that encodes the input to BFP itself in one pass and keeps each output
  tile's int16/int32 sums in registers and its float sums in L1.
- the eager path, for everything else (grouped and depthwise convs, the flat layout, activation
  blocks that cut weight blocks, CUDA, CPUs without AVX-512 or a compiler), and for every layer
  with set_backend(model, "int", kernel="eager") or DSQ_INT_KERNEL=0: `torch._int_mm` per unit
  over an int8 im2col, or broadcast int32 products over all groups at once for grouped and
  depthwise convs.

Both sum the units in float64 and round once to float32 (every product dot * step * alpha is
exact in float64): the result is the exactly rounded value of the formula above, the same bit for
bit on either path, in any batch and with any number of threads: the output of the exact backend
(dsq.nn.exact_backend), which also computes the layers with a float input here. The simulated
backend, which sums in float32, equals it up to that summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from ..formats import bfp_encode
from .geometry import pad_amounts, patches
from .int_kernel import int_matmul
from .int_plan import KernelPlan, Plan, plan_for
from .stand_in import StandInWeight


def _run_kernel(
    x: torch.Tensor,
    layer,
    kp: KernelPlan,
    bias,
    kernel=(1, 1),
    stride=(1, 1),
    dilation=(1, 1),
    pads=(0, 0, 0, 0),
    nchw: bool = True,
) -> torch.Tensor:
    """dsq::int_conv on an input (N, C, H, W), zero-padded by `pads` (left, right, top, bottom):
    (N, O, OH, OW) float32, contiguous if `nchw`, else channels-last."""
    x = x.float()
    if not (x.stride(3) == 1 or x.stride(1) == 1):
        x = x.contiguous(memory_format=torch.contiguous_format if nchw else torch.channels_last)
    if bias is not None:
        bias = F.pad(bias.detach().float(), (0, kp.alpha.shape[-1] - kp.out_channels)).contiguous()
    fmt = layer.act_format
    out = torch.ops.dsq.int_conv(
        x,
        kp.weight,
        kp.alpha,
        kp.comp,
        bias,
        list(kernel),
        list(stride),
        list(dilation),
        list(pads),
        fmt.bits,
        fmt.block,
        kp.chunk,
        nchw,
    )
    # Dense like torch's own conv output: later float ops (BatchNorm) round a strided view differently.
    if nchw:
        return out[:, : kp.out_channels].contiguous()
    return out[..., : kp.out_channels].permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def _int_dot(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(P, G, L) int8 by (G, L, O/G) int8 -> (P, G, O/G) int32: each group's exact dot products.

    Loops over the shorter of the two axes: one integer GEMM per group when there are few groups,
    else one broadcast int32 product per channel (depthwise: a single one).
    """
    groups, length = w.shape[:2]
    if groups <= length:
        parts = [int_matmul(a[:, g], w[g]) for g in range(groups)]
        return parts[0].unsqueeze(1) if groups == 1 else torch.stack(parts, 1)
    out = a[:, :, 0, None].int() * w[:, 0].int()
    for c in range(1, length):
        out += a[:, :, c, None].int() * w[:, c].int()
    return out


def _accumulate(cols: torch.Tensor, steps: torch.Tensor, plan: Plan, bias) -> torch.Tensor:
    """Sum every unit's scaled integer dot products and the bias in float64, rounded once: (P, T, C')
    int8 mantissas and (P, T, nb) BFP steps at each output position and tap -> (P, O) float32."""
    p, g = cols.shape[0], plan.groups
    acc = torch.zeros(p, g, plan.units[0].alpha.shape[1], dtype=torch.float64, device=cols.device)
    for u in plan.units:
        a = cols[:, u.tap, : plan.in_channels].unflatten(1, (g, -1))[:, :, u.channels]
        step = steps[:, u.tap].index_select(1, u.act_block).double()  # (P, G)
        acc.addcmul_(_int_dot(a, u.weight) * step.unsqueeze(-1), u.alpha.double())  # int32 * 2^e: exact
    acc = acc.flatten(1)
    return (acc if bias is None else acc + bias.double()).float()


def _encode(x: torch.Tensor, fmt) -> tuple[torch.Tensor, torch.Tensor]:
    """BFP along the last axis: int8 mantissas (..., C') (zero-padded to whole blocks) and the
    power-of-two step of every block (..., nb)."""
    mant, step = bfp_encode(x, fmt, dim=-1)
    return mant.flatten(-2), step.squeeze(-1).float()


def int_conv2d(input, weight: "IntWeight", bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """F.conv2d on integers: the input is BFP-encoded channels-last and padded (mantissa 0), then
    the CPU kernel or the eager path (an int8 im2col) runs; `weight` stands for a DSConv layer's
    VQK and KDS. Returns float32, contiguous for a contiguous input, else channels-last."""
    if input.dim() == 3:  # unbatched (C, H, W), as F.conv2d allows
        return int_conv2d(input[None], weight, bias, stride, padding, dilation, groups)[0]
    layer = weight.layer
    plan = plan_for(layer, input.shape[1])
    if groups != layer.groups:
        raise RuntimeError(f"the layer has groups={layer.groups}, the call asked for {groups}")
    kernel, stride, dilation = tuple(weight.shape[-2:]), _pair(stride), _pair(dilation)
    pads = pad_amounts(padding, kernel, dilation)
    # The result has F.conv2d's memory format (contiguous for a contiguous input, else channels-last),
    # so that the layers after it (BatchNorm, pooling) sum in the same order as after a simulated conv.
    nchw = input.is_contiguous()
    if plan.kernel is not None:
        if kernel == (1, 1) and not any(pads) and stride != (1, 1):  # encode only the pixels it reads
            input, stride = input[:, :, :: stride[0], :: stride[1]], (1, 1)
        return _run_kernel(input, layer, plan.kernel, bias, kernel, stride, dilation, pads, nchw)
    mant, step = _encode(F.pad(input, pads).permute(0, 2, 3, 1), layer.act_format)
    cols = patches(mant, kernel, stride, dilation)
    steps = patches(step, kernel, stride, dilation).flatten(0, 2)
    out = _accumulate(cols.flatten(0, 2), steps, plan, bias).view(*cols.shape[:3], -1).permute(0, 3, 1, 2)
    return out.contiguous() if nchw else out


def int_linear(input, weight: "IntWeight", bias=None) -> torch.Tensor:
    """F.linear on integers: a 1x1 convolution over the last axis."""
    layer = weight.layer
    plan = plan_for(layer, input.shape[-1])
    if plan.kernel is not None:
        out = _run_kernel(input.reshape(-1, input.shape[-1], 1, 1), layer, plan.kernel, bias)
    else:
        mant, step = _encode(input, layer.act_format)
        out = _accumulate(mant.reshape(-1, 1, mant.shape[-1]), step.reshape(-1, 1, step.shape[-1]), plan, bias)
    return out.reshape(*input.shape[:-1], -1)


class IntWeight(StandInWeight):
    """A DSConv layer's `weight` under the int backend: F.conv2d or F.linear called with it run
    `int_conv2d` / `int_linear`; any other use sees the dequantized weight alpha * q."""

    kernels = {F.conv2d: int_conv2d, F.linear: int_linear}
