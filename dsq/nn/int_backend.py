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
from .epilogue import Epilogue, take_output_epilogue
from .geometry import output_size, pad_amounts, patches
from .int_kernel import int_matmul
from .int_plan import KernelPlan, Plan, plan_for
from .stand_in import StandInWeight


def _channels(t: torch.Tensor | None, count: int, dtype: torch.dtype) -> torch.Tensor | None:
    """A per-output-channel vector padded with zeros to the kernel's `count` channels (no copy if
    it has them)."""
    if t is None:
        return None
    t = t.detach().to(dtype)
    return (t if t.shape[0] == count else F.pad(t, (0, count - t.shape[0]))).contiguous()


def _kernel_residual(residual: torch.Tensor | None, count: int, nchw: bool) -> torch.Tensor | None:
    """The residual laid out as the kernel's output, (N, O', OH, OW) if `nchw`, else (N, OH, OW, O')
    (no copy if it is)."""
    if residual is None:
        return None
    r = residual.float() if nchw else residual.float().permute(0, 2, 3, 1)
    missing = count - (r.shape[1] if nchw else r.shape[-1])
    if missing:
        r = F.pad(r, (0, 0, 0, 0, 0, missing)) if nchw else F.pad(r, (0, missing))
    return r.contiguous()


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
    epilogue: Epilogue = Epilogue(),
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """dsq::int_conv on an input (N, C, H, W), zero-padded by `pads` (left, right, top, bottom),
    with the output epilogue: (N, O, OH, OW) float32, contiguous if `nchw`, else channels-last."""
    x = x.float()
    if not (x.stride(3) == 1 or x.stride(1) == 1):
        x = x.contiguous(memory_format=torch.contiguous_format if nchw else torch.channels_last)
    count = kp.alpha.shape[-1]
    fmt = layer.act_format
    out = torch.ops.dsq.int_conv(
        x,
        kp.weight,
        kp.alpha,
        kp.comp,
        _channels(bias, count, torch.float32),
        list(kernel),
        list(stride),
        list(dilation),
        list(pads),
        fmt.bits,
        fmt.block,
        kp.chunk,
        nchw,
        _channels(epilogue.scale, count, torch.float64),
        _channels(epilogue.shift, count, torch.float64),
        _kernel_residual(residual, count, nchw),
        epilogue.lo,
        epilogue.hi,
        kp.isa,
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


def _accumulate(cols: torch.Tensor, steps: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Sum every unit's scaled integer dot products in float64: (P, T, C') int8 mantissas and
    (P, T, nb) BFP steps at each output position and tap -> (P, O) float64."""
    p, g = cols.shape[0], plan.groups
    acc = torch.zeros(p, g, plan.units[0].alpha.shape[1], dtype=torch.float64, device=cols.device)
    for u in plan.units:
        a = cols[:, u.tap, : plan.in_channels].unflatten(1, (g, -1))[:, :, u.channels]
        step = steps[:, u.tap].index_select(1, u.act_block).double()  # (P, G)
        acc.addcmul_(_int_dot(a, u.weight) * step.unsqueeze(-1), u.alpha.double())  # int32 * 2^e: exact
    return acc.flatten(1)


def _encode(x: torch.Tensor, fmt) -> tuple[torch.Tensor, torch.Tensor]:
    """BFP along the last axis: int8 mantissas (..., C') (zero-padded to whole blocks) and the
    power-of-two step of every block (..., nb)."""
    mant, step = bfp_encode(x, fmt, dim=-1)
    return mant.flatten(-2), step.squeeze(-1).float()


def int_conv2d(input, weight: "IntWeight", bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """F.conv2d on integers: the input is BFP-encoded channels-last and padded (mantissa 0), then
    the CPU kernel or the eager path (an int8 im2col) runs, and the layer's output epilogue, if a
    fused network gave it one (dsq.nn.epilogue); `weight` stands for a DSConv layer's VQK and KDS.
    Returns float32, contiguous for a contiguous input, else channels-last."""
    layer, kernel = weight.layer, tuple(weight.shape[-2:])
    epilogue, residual = take_output_epilogue(layer)
    if input.dim() == 3:  # unbatched (C, H, W), as F.conv2d allows
        residual = None if residual is None else residual[None]
        return _conv2d(input[None], layer, kernel, bias, stride, padding, dilation, groups, epilogue, residual)[0]
    return _conv2d(input, layer, kernel, bias, stride, padding, dilation, groups, epilogue, residual)


def _conv2d(input, layer, kernel, bias, stride, padding, dilation, groups, epilogue: Epilogue, residual):
    plan = plan_for(layer, input.shape[1])
    if groups != layer.groups:
        raise RuntimeError(f"the layer has groups={layer.groups}, the call asked for {groups}")
    stride, dilation = _pair(stride), _pair(dilation)
    pads = pad_amounts(padding, kernel, dilation)
    # The result has F.conv2d's memory format (contiguous for a contiguous input, else channels-last),
    # so that the layers after it (BatchNorm, pooling) sum in the same order as after a simulated conv.
    nchw = input.is_contiguous()
    if plan.kernel is not None:
        padded = (input.shape[2] + pads[2] + pads[3], input.shape[3] + pads[0] + pads[1])
        size = output_size(*padded, kernel, stride, dilation)
        if residual is not None and residual.shape != (input.shape[0], plan.kernel.out_channels, *size):
            rounded = _conv2d(input, layer, kernel, bias, stride, padding, dilation, groups, epilogue.rounding(), None)
            return epilogue.finish(rounded, residual)  # a broadcast residual: added outside the kernel
        if kernel == (1, 1) and not any(pads) and stride != (1, 1):  # encode only the pixels it reads
            input, stride = input[:, :, :: stride[0], :: stride[1]], (1, 1)
        return _run_kernel(input, layer, plan.kernel, bias, kernel, stride, dilation, pads, nchw, epilogue, residual)
    mant, step = _encode(F.pad(input, pads).permute(0, 2, 3, 1), layer.act_format)
    cols = patches(mant, kernel, stride, dilation)
    steps = patches(step, kernel, stride, dilation).flatten(0, 2)
    acc = _accumulate(cols.flatten(0, 2), steps, plan)
    acc = acc.view(*cols.shape[:3], acc.shape[-1]).permute(0, 3, 1, 2)  # (N, O, OH, OW), N = 0 too
    out = epilogue.apply(acc, bias, residual)
    return out.contiguous() if nchw else out.contiguous(memory_format=torch.channels_last)


def int_linear(input, weight: "IntWeight", bias=None) -> torch.Tensor:
    """F.linear on integers: a 1x1 convolution over the last axis, then the layer's output epilogue."""
    layer = weight.layer
    epilogue, residual = take_output_epilogue(layer)
    plan = plan_for(layer, input.shape[-1])
    if plan.kernel is not None:
        flat = input.reshape(-1, input.shape[-1], 1, 1)
        out = _run_kernel(flat, layer, plan.kernel, bias, epilogue=epilogue.rounding())
        return epilogue.finish(out.reshape(*input.shape[:-1], out.shape[1]), residual)
    mant, step = _encode(input, layer.act_format)
    acc = _accumulate(mant.reshape(-1, 1, mant.shape[-1]), step.reshape(-1, 1, step.shape[-1]), plan)
    return epilogue.apply(acc.reshape(*input.shape[:-1], acc.shape[-1]), bias, residual, channel_dim=-1)


class IntWeight(StandInWeight):
    """A DSConv layer's `weight` under the int backend: F.conv2d or F.linear called with it run
    `int_conv2d` / `int_linear`; any other use sees the dequantized weight alpha * q."""

    kernels = {F.conv2d: int_conv2d, F.linear: int_linear}
