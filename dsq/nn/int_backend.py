"""The "int" backend: DSConv layers computed with integer dot products (spec section 3).

    out[o, p] = sum over units u of  alpha_u[o] * step_u[p] * sum_c q[o, c, tap_u] * mant[c, p + tap_u]

A *unit* is one kernel tap and one run of input channels (within a group) over which both the
weight block (one KDS value alpha) and the activation block (one BFP step, a power of two) stay
the same. The inner sum multiplies the int8 VQK with the int8 BFP mantissas and adds in int32,
exactly; only one float multiply-add per unit and output remains. With the channel layout and
activation blocks aligned to the weight blocks, the units are the KDS slices (block, tap); the
flat layout (blocks over in-channels x taps) is cut at every tap too, because the activation
exponent changes from one position to the next.

Ungrouped convs (and linear layers) run one `torch._int_mm` per unit over an int8 im2col;
grouped and depthwise convs, whose dot products are a few channels long, run broadcast int32
products over all groups at once. The result equals the simulated backend up to float
summation order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair
from torch.utils._pytree import tree_map_only

from ..errors import DsqError
from ..formats import CHANNEL, bfp_encode, dequantize

INT_DEVICES = ("cpu", "cuda")  # where torch has an int8 x int8 -> int32 matrix product (torch._int_mm)


def check_int_device(device: torch.device) -> None:
    """DsqError unless torch offers an integer matrix product on `device`."""
    if device.type not in INT_DEVICES:
        raise DsqError(f"the int backend needs an int8 matrix product (torch._int_mm), which torch has on "
                       f"{' and '.join(INT_DEVICES)} but not on {device.type}: use the simulate backend there")


@dataclass
class Unit:
    """One tap and one run of group-relative input channels with one KDS value and one BFP step."""

    tap: int
    channels: slice
    weight: torch.Tensor  # (G, L, O/G) int8: the VQK of this tap and run, every group
    act_block: torch.Tensor  # (G,) int64: the activation block that holds each group's run
    alpha: torch.Tensor  # (G, O/G) float32: the KDS of the weight block that holds the run


@dataclass
class Plan:
    """A layer's units, prepared once from its VQK and KDS (and rebuilt when they change)."""

    source: tuple[torch.Tensor, torch.Tensor]  # the VQK and KDS tensors it was built from
    versions: tuple[int, int]  # and their versions then
    in_channels: int
    groups: int
    units: list[Unit]

    def fits(self, vqk: torch.Tensor, kds: torch.Tensor) -> bool:
        return self.source[0] is vqk and self.source[1] is kds and self.versions == (vqk._version, kds._version)


def _runs(cuts: torch.Tensor) -> list[slice]:
    """The slices between the True entries of `cuts` (cuts[0] is True)."""
    starts = cuts.nonzero().flatten().tolist()
    return [slice(a, b) for a, b in zip(starts, starts[1:] + [len(cuts)])]


def _build_plan(layer) -> Plan:
    """Cut the layer's input axis into units at every tap (see the module docstring)."""
    layout, block = layer.layout, layer.weight_format.block
    o, i, kh, kw = layout.shape
    groups, taps = getattr(layer, "groups", 1), kh * kw
    vqk = layer.vqk.reshape(groups, o // groups, i, taps)  # views: the plan holds no copy of VQK or KDS
    kds = layer.kds.reshape(o, layout.scale_shape[1], -1)  # (O, nb, T) channel, (O, nb, 1) flat
    channel = torch.arange(i)
    act_block = (torch.arange(groups)[:, None] * i + channel) // layer.act_format.block  # (G, I)
    act_cuts = F.pad((act_block[:, 1:] != act_block[:, :-1]).any(0), (1, 0), value=True)
    act_block = act_block.to(layer.vqk.device)
    units = []
    for tap in range(taps):
        wblock = channel // block if layout.kind == CHANNEL else (channel * taps + tap) // block
        cuts = act_cuts | F.pad(wblock[1:] != wblock[:-1], (1, 0), value=True)
        for run in _runs(cuts):
            alpha = kds[:, int(wblock[run.start]), tap if layout.kind == CHANNEL else 0].reshape(groups, -1)
            weight = vqk[:, :, run, tap].transpose(1, 2)
            units.append(Unit(tap, run, weight, act_block[:, run.start], alpha.float()))
    return Plan((layer.vqk, layer.kds), (layer.vqk._version, layer.kds._version), groups * i, groups, units)


def plan_for(layer, in_channels: int) -> Plan:
    """The layer's cached Plan (rebuilt when its VQK or KDS are changed or replaced, e.g. moved
    to another device), for an input with `in_channels` channels."""
    plan = layer.__dict__.get("_int_plan")
    if plan is None or not plan.fits(layer.vqk, layer.kds):
        check_int_device(layer.vqk.device)
        plan = layer._int_plan = _build_plan(layer)
    if in_channels != plan.in_channels:
        raise RuntimeError(f"the layer expects {plan.in_channels} input channels, got {in_channels}")
    return plan


def _int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for int8 matrices, summed exactly in int32 by torch._int_mm.

    The CPU takes any shape. CUDA wants more than 16 rows and inner and output widths that are
    multiples of 8: zero padding, which adds nothing to any sum, makes every shape fit.
    """
    (m, k), n = a.shape, b.shape[1]
    if a.device.type == "cuda" and (m <= 16 or k % 8 or n % 8):
        a, b = F.pad(a, (0, -k % 8, 0, max(17 - m, 0))), F.pad(b, (0, -n % 8, 0, -k % 8))
        return torch._int_mm(a, b)[:m, :n]
    return torch._int_mm(a, b)


def _int_dot(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(P, G, L) int8 by (G, L, O/G) int8 -> (P, G, O/G) int32: each group's exact dot products.

    Loops over the shorter of the two axes: one integer GEMM per group when there are few groups,
    else one broadcast int32 product per channel (depthwise: a single one).
    """
    groups, length = w.shape[:2]
    if groups <= length:
        parts = [_int_matmul(a[:, g], w[g]) for g in range(groups)]
        return parts[0].unsqueeze(1) if groups == 1 else torch.stack(parts, 1)
    out = a[:, :, 0, None].int() * w[:, 0].int()
    for c in range(1, length):
        out += a[:, :, c, None].int() * w[:, c].int()
    return out


def _accumulate(cols: torch.Tensor, steps: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Sum every unit's scaled integer dot products: (P, T, C') int8 mantissas and (P, T, nb)
    BFP steps at each output position and tap -> (P, O) float32."""
    p, g = cols.shape[0], plan.groups
    acc = torch.zeros(p, g, plan.units[0].alpha.shape[1], dtype=torch.float32, device=cols.device)
    for u in plan.units:
        a = cols[:, u.tap, : plan.in_channels].unflatten(1, (g, -1))[:, :, u.channels]
        step = steps[:, u.tap].index_select(1, u.act_block)  # (P, G)
        acc.addcmul_(_int_dot(a, u.weight) * step.unsqueeze(-1), u.alpha)  # int32 * 2^e: exact in float32
    return acc.flatten(1)


def _encode(x: torch.Tensor, fmt) -> tuple[torch.Tensor, torch.Tensor]:
    """BFP along the last axis: int8 mantissas (..., C') (zero-padded to whole blocks) and the
    power-of-two step of every block (..., nb)."""
    mant, step = bfp_encode(x, fmt, dim=-1)
    return mant.flatten(-2), step.squeeze(-1).float()


def _padding(padding, kernel: tuple[int, int], dilation: tuple[int, int]) -> list[int]:
    """F.conv2d's padding argument as F.pad amounts (left, right, top, bottom)."""
    if padding == "valid":
        return [0, 0, 0, 0]
    if padding == "same":  # as torch: the odd pixel goes to the right / bottom
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return [total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2]
    ph, pw = _pair(padding)
    return [pw, pw, ph, ph]


def _patches(t: torch.Tensor, kernel, stride, dilation) -> torch.Tensor:
    """(N, H, W, D) -> (N, OH, OW, kh * kw, D): what each output position reads at each tap."""
    t = t.contiguous()
    n, h, w, d = t.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    s_n, s_h, s_w, s_d = t.stride()
    view = t.as_strided((n, oh, ow, kh, kw, d), (s_n, s_h * sh, s_w * sw, s_h * dh, s_w * dw, s_d))
    return view.reshape(n, oh, ow, kh * kw, d)


def int_conv2d(input, weight: "IntWeight", bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """F.conv2d on integers: the input is padded, BFP-encoded and unfolded as int8, `weight`
    stands for a DSConv layer's VQK and KDS. Returns a channels-last float32 result."""
    if input.dim() == 3:  # unbatched (C, H, W), as F.conv2d allows
        return int_conv2d(input[None], weight, bias, stride, padding, dilation, groups)[0]
    layer = weight.layer
    plan = plan_for(layer, input.shape[1])
    if groups != layer.groups:
        raise RuntimeError(f"the layer has groups={layer.groups}, the call asked for {groups}")
    kernel, stride, dilation = tuple(weight.shape[-2:]), _pair(stride), _pair(dilation)
    x = F.pad(input, _padding(padding, kernel, dilation))
    mant, step = _encode(x.permute(0, 2, 3, 1), layer.act_format)
    cols = _patches(mant, kernel, stride, dilation)
    n, oh, ow = cols.shape[:3]
    steps = _patches(step, kernel, stride, dilation).flatten(0, 2)
    out = _accumulate(cols.flatten(0, 2), steps, plan).view(n, oh, ow, -1).permute(0, 3, 1, 2)
    return out if bias is None else out + bias[:, None, None]


def int_linear(input, weight: "IntWeight", bias=None) -> torch.Tensor:
    """F.linear on integers: a 1x1 convolution over the last axis."""
    mant, step = _encode(input, weight.layer.act_format)
    out = _accumulate(mant.reshape(-1, 1, mant.shape[-1]), step.reshape(-1, 1, step.shape[-1]),
                      plan_for(weight.layer, input.shape[-1]))
    out = out.view(*input.shape[:-1], -1)
    return out if bias is None else out + bias


_KERNELS = {F.conv2d: int_conv2d, F.linear: int_linear}


class IntWeight(torch.Tensor):
    """A DSConv layer's `weight` under the int backend: the weight's shape, dtype and device,
    but no float storage. F.conv2d or F.linear called with it run `int_conv2d` / `int_linear`,
    whoever calls them (nn.Conv2d's forward, or a subclass that pads first); any other use
    sees the dequantized weight alpha * q."""

    @staticmethod
    def __new__(cls, layer):
        self = torch.Tensor._make_wrapper_subclass(cls, layer.vqk.shape, dtype=layer.kds.dtype,
                                                   device=layer.vqk.device)
        self.layer = layer
        return self

    def __repr__(self) -> str:
        return f"IntWeight(shape={tuple(self.shape)}, layer={type(self.layer).__name__})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        if func in _KERNELS and isinstance(weight, IntWeight):
            return _KERNELS[func](*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def dequantized(w: IntWeight) -> torch.Tensor:
            return dequantize(w.layer.vqk, w.layer.kds, w.layer.layout).reshape(w.shape)

        args, kwargs = tree_map_only(IntWeight, dequantized, (args, kwargs or {}))
        return func(*args, **kwargs)
