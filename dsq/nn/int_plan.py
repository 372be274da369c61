"""The int backend's plan of a layer: its VQK and KDS cut into units, and packed for the CPU
kernel where it applies, once per layer (rebuilt when they change); dsq.nn.int_backend runs it.

A *unit* is one kernel tap and one run of input channels (within a group) over which both the
weight block (one KDS value alpha) and the activation block (one BFP step) stay the same
(docs/integer-backend.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import DsqError
from ..formats import CHANNEL
from ..formats.blocks import block_width
from .int_kernel import fit_last, kernel_isas

INT_DEVICES = ("cpu", "cuda")  # where torch has an int8 x int8 -> int32 matrix product (torch._int_mm)
# The C++ CPU kernel where it applies, with the best instruction set here ("auto") or a given one,
# or the eager path everywhere.
INT_KERNELS = ("auto", "amx", "vnni", "avx512bw", "eager")


def check_int_device(device: torch.device) -> None:
    """DsqError unless torch offers an integer matrix product on `device`."""
    if device.type not in INT_DEVICES:
        raise DsqError(
            f"the int backend needs an int8 matrix product (torch._int_mm), which torch has on "
            f"{' and '.join(INT_DEVICES)} but not on {device.type}: use the simulate backend there"
        )


def check_int_kernel(kernel: str) -> None:
    """DsqError unless `kernel` is one of INT_KERNELS and runs on this machine."""
    if kernel not in INT_KERNELS:
        raise DsqError(f"unknown int kernel {kernel!r}: use one of {', '.join(INT_KERNELS)}")
    if kernel not in ("auto", "eager") and kernel not in kernel_isas():
        here = ", ".join(kernel_isas()) or "none (it needs AVX-512 and a C++ compiler)"
        raise DsqError(f"the int kernel {kernel!r} does not run on this CPU (here: {here}): use 'auto' or 'eager'")


@dataclass
class Unit:
    """One tap and one run of group-relative input channels with one KDS value and one BFP step."""

    tap: int
    channels: slice
    weight: torch.Tensor  # (G, L, O/G) int8: the VQK of this tap and run, every group
    act_block: torch.Tensor  # (G,) int64: the activation block that holds each group's run
    alpha: torch.Tensor  # (G, O/G) float32: the KDS of the weight block that holds the run


@dataclass
class KernelPlan:
    """A copy of a layer's VQK and KDS laid out for dsq::int_conv: units (tap, block) of `run`
    channels, in one weight plane, or two (q = 16 hi + lo, both within +-8) for 8-bit weights."""

    weight: torch.Tensor  # (T, nb, planes, O'/16, run/4, 16, 4) int8, O' = O rounded up to 16
    alpha: torch.Tensor  # (T, nb, planes, O') float32 (the hi plane's: 16 alpha, exact)
    comp: torch.Tensor  # (T, nb, planes, O') int32: 128 x the unit's VQK sum (the inputs are uint8 = mant + 128)
    run: int  # input channels per block that the kernel reads: the block, padded to a multiple of 4
    chunk: int  # groups of 4 channels whose int16 pair sums cannot overflow
    out_channels: int
    isa: str  # the instruction set of the tiles that run it (dsq.nn.int_kernel.kernel_isas)


@dataclass
class Plan:
    """A layer's units, prepared once from its VQK and KDS (and rebuilt when they change)."""

    source: tuple[torch.Tensor, torch.Tensor]  # the VQK and KDS tensors it was built from
    versions: tuple[int, int]  # and their versions then
    in_channels: int
    groups: int
    units: list[Unit]
    kernel: KernelPlan | None
    int_kernel: str  # the layer's choice (INT_KERNELS) when the plan was made

    def fits(self, layer) -> bool:
        vqk, kds = layer.vqk, layer.kds
        return (
            self.source[0] is vqk
            and self.source[1] is kds
            and self.versions == (vqk._version, kds._version)
            and self.int_kernel == _int_kernel(layer)
        )


def _int_kernel(layer) -> str:
    """The layer's kernel choice, set by set_backend(..., kernel=...)."""
    return getattr(layer, "int_kernel", "auto")


def plan_for(layer, in_channels: int) -> Plan:
    """The layer's cached Plan (rebuilt when its VQK or KDS are changed or replaced, e.g. moved
    to another device, or its kernel choice changes), for an input with `in_channels` channels."""
    plan = layer.__dict__.get("_int_plan")
    if plan is None or not plan.fits(layer):
        check_int_device(layer.vqk.device)
        plan = layer._int_plan = build_plan(layer)
    if in_channels != plan.in_channels:
        raise RuntimeError(f"the layer expects {plan.in_channels} input channels, got {in_channels}")
    return plan


def _runs(cuts: torch.Tensor) -> list[slice]:
    """The slices between the True entries of `cuts` (cuts[0] is True)."""
    starts = cuts.nonzero().flatten().tolist()
    return [slice(a, b) for a, b in zip(starts, starts[1:] + [len(cuts)])]


def build_plan(layer) -> Plan:
    """Cut the layer's input axis into units at every tap and at every weight or activation
    block edge; pack it for the CPU kernel where that applies and the layer's choice allows."""
    layout, block = layer.layout, layer.weight_format.block
    o, i, kh, kw = layout.shape
    groups, taps = getattr(layer, "groups", 1), kh * kw
    vqk = layer.vqk.reshape(groups, o // groups, i, taps)  # views: the units hold no copy of VQK or KDS
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
    choice = _int_kernel(layer)
    kernel = None
    if choice != "eager" and _kernel_applies(layer, groups):
        kernel = kernel_plan(layer, kernel_isas()[-1] if choice == "auto" else choice)
    return Plan(
        (layer.vqk, layer.kds), (layer.vqk._version, layer.kds._version), groups * i, groups, units, kernel, choice
    )


def _kernel_applies(layer, groups: int) -> bool:
    """Whether the CPU kernel runs the layer: an ungrouped conv or linear on the CPU, with the
    channel layout and activation blocks that do not cut weight blocks, on a machine that has it."""
    c = layer.layout.shape[1]
    block, act_block = layer.weight_format.block, layer.act_format.block
    aligned = act_block == block or c <= min(block, act_block)
    return (
        groups == 1
        and layer.layout.kind == CHANNEL
        and aligned
        and layer.vqk.device.type == "cpu"
        and bool(kernel_isas())
    )


def kernel_plan(layer, isa: str) -> KernelPlan:
    """The layer's VQK and KDS laid out for dsq::int_conv, run with the tiles of `isa`."""
    o, c, kh, kw = layer.layout.shape
    width = block_width(c, layer.weight_format.block)  # a block longer than the channels is all of them
    nb, taps, run, out = -(-c // width), kh * kw, -(-width // 4) * 4, -(-o // 16) * 16
    q = F.pad(layer.vqk.reshape(o, c, taps), (0, 0, 0, nb * width - c)).view(o, nb, width, taps)
    q = F.pad(fit_last(q.permute(3, 1, 0, 2), run), (0, 0, 0, out - o)).short()  # (T, nb, O', run)
    alpha = F.pad(layer.kds.reshape(o, nb, taps).permute(2, 1, 0).float(), (0, out - o))
    if int(q.abs().max()) > 64:  # uint8 x int8 pair sums could pass 2^15: split q = 16 hi + lo
        lo = (q + 8) % 16 - 8
        q, alpha = torch.stack([(q - lo) // 16, lo], 2), torch.stack([alpha * 16, alpha], 2)
    else:
        q, alpha = q[:, :, None], alpha[:, :, None]
    chunk = 32767 // (2 * 255 * max(int(q.abs().max()), 1))  # vpmaddubsw pair sums, added `chunk` times
    weight = q.reshape(*q.shape[:3], out // 16, 16, run // 4, 4).transpose(-3, -2).to(torch.int8).contiguous()
    comp = 128 * q.sum(-1, dtype=torch.int32)
    return KernelPlan(weight, alpha.contiguous(), comp.contiguous(), run, chunk, o, isa)
