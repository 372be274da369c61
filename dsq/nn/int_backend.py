"""The "int" backend: DSConv layers computed with integer dot products (docs/method.md §5).

    out[o, p] = sum over units u of  alpha_u[o] * step_u[p] * sum_c q[o, c, tap_u] * mant[c, p + tap_u]

A *unit* is one kernel tap and one run of input channels (within a group) over which both the
weight block (one KDS value alpha) and the activation block (one BFP step, a power of two) stay
the same. The inner sum multiplies the int8 VQK with the int8 BFP mantissas and adds in int32,
exactly; only one float multiply-add per unit and output remains. With the channel layout and
activation blocks aligned to the weight blocks, the units are the KDS slices (block, tap); the
flat layout (blocks over in-channels x taps) is cut at every tap too, because the activation
exponent changes from one position to the next.

Two ways to run it:

- the CPU kernel (`_KERNEL_SOURCE`: C++ with AVX-512BW, compiled on first use and cached by torch)
  runs ungrouped convs and linear layers whose weights have the channel layout and whose
  activation blocks match the weight blocks (ResNets, the 1x1 convs of MobileNets): a direct
  convolution, no im2col, that encodes the input to BFP itself in one pass and keeps each output
  tile's int16/int32 sums in registers and its float sums in L1, so the per-unit epilogue costs
  no memory traffic; each unit's weights are read once per tile of 32 output positions. vpmaddubsw
  multiplies uint8 (mantissa + 128) by int8; weights of 8 bits run as two planes of 4-bit ones.
- the eager path, for everything else (grouped and depthwise convs, the flat layout, activation
  blocks that cut weight blocks, CUDA, CPUs without AVX-512 or a compiler; DSQ_INT_KERNEL=0 forces
  it): `torch._int_mm` per unit over an int8 im2col, or broadcast int32 products over all groups
  at once for grouped and depthwise convs.

Both sum the units in float64 and round once to float32 (`FLOAT64_SUMS`; every product
dot * step * alpha is exact in float64): the result is the exactly rounded value of the formula
above, the same bit for bit on either path, in any batch and with any number of threads: the
output of the exact backend (dsq.nn.exact_backend), which also computes the layers with a float
input here. The simulated backend, which sums in float32, equals it up to that summation order.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from ..errors import DsqError
from ..formats import CHANNEL, bfp_encode
from ..formats.blocks import block_width
from .stand_in import StandInWeight

INT_DEVICES = ("cpu", "cuda")  # where torch has an int8 x int8 -> int32 matrix product (torch._int_mm)
FLOAT64_SUMS = True  # sum the units in float64 and round once (see the module docstring)
KERNEL = os.environ.get("DSQ_INT_KERNEL", "1") != "0"  # use the C++ CPU kernel where it applies
_kernel_module = None  # the compiled kernel; False where it cannot be built or run


def check_int_device(device: torch.device) -> None:
    """DsqError unless torch offers an integer matrix product on `device`."""
    if device.type not in INT_DEVICES:
        raise DsqError(f"the int backend needs an int8 matrix product (torch._int_mm), which torch has on "
                       f"{' and '.join(INT_DEVICES)} but not on {device.type}: use the simulate backend there")


def cpu_kernel():
    """The compiled CPU kernel, or None where it does not run: DSQ_INT_KERNEL=0, a CPU without
    AVX-512 (F, BW, DQ, VL), or no C++ compiler (then with a warning, once)."""
    global _kernel_module
    if not KERNEL:
        return None
    if _kernel_module is None:
        _kernel_module = _build_kernel() if torch.backends.cpu.get_cpu_capability() == "AVX512" else False
    return _kernel_module or None


def _build_kernel():
    """Compile `_KERNEL_SOURCE` (about a minute, once: torch caches it under TORCH_EXTENSIONS_DIR)."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)  # its import says "No CUDA runtime is found", which does not matter here
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline("dsq_int_kernel", [_KERNEL_SOURCE], extra_ldflags=["-fopenmp"],
                           extra_cflags=["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl",
                                         "-mfma"])
    except Exception as e:  # noqa: BLE001 - any build failure means: run on the eager path
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(f"dsq: the int backend's CPU kernel could not be built ({reason}); "
                      "the int backend runs on its slower eager path", RuntimeWarning, stacklevel=3)
        return False
    finally:
        log.setLevel(level)


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
    """A copy of a layer's VQK and KDS laid out for the CPU kernel: units (tap, block) of `run`
    channels, in one weight plane, or two (q = 16 hi + lo, both within +-8) for 8-bit weights."""

    weight: torch.Tensor  # (T, nb, planes, O'/16, run/4, 16, 4) int8, O' = O rounded up to 16
    alpha: torch.Tensor  # (T, nb, planes, O') float32 (the hi plane's: 16 alpha, exact)
    comp: torch.Tensor  # (T, nb, planes, O') int32: 128 x the unit's VQK sum (the inputs are uint8 = mant + 128)
    run: int  # input channels per block that the kernel reads: the block, padded to a multiple of 4
    chunk: int  # groups of 4 channels whose int16 pair sums cannot overflow
    out_channels: int


@dataclass
class Plan:
    """A layer's units, prepared once from its VQK and KDS (and rebuilt when they change)."""

    source: tuple[torch.Tensor, torch.Tensor]  # the VQK and KDS tensors it was built from
    versions: tuple[int, int]  # and their versions then
    in_channels: int
    groups: int
    units: list[Unit]
    kernel: KernelPlan | None
    use_kernel: bool  # KERNEL when the plan was made

    def fits(self, vqk: torch.Tensor, kds: torch.Tensor) -> bool:
        return (self.source[0] is vqk and self.source[1] is kds and self.versions == (vqk._version, kds._version)
                and self.use_kernel == KERNEL)


def _runs(cuts: torch.Tensor) -> list[slice]:
    """The slices between the True entries of `cuts` (cuts[0] is True)."""
    starts = cuts.nonzero().flatten().tolist()
    return [slice(a, b) for a, b in zip(starts, starts[1:] + [len(cuts)])]


def _build_plan(layer) -> Plan:
    """Cut the layer's input axis into units at every tap (see the module docstring)."""
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
    return Plan((layer.vqk, layer.kds), (layer.vqk._version, layer.kds._version), groups * i, groups, units,
                _kernel_plan(layer, groups), KERNEL)


def _fit_last(t: torch.Tensor, length: int, value: int = 0) -> torch.Tensor:
    """`t` cut or padded with `value` to `length` along its last axis."""
    extra = length - t.shape[-1]
    return F.pad(t, (0, extra), value=value) if extra > 0 else t[..., :length]


def _kernel_plan(layer, groups: int) -> KernelPlan | None:
    """The layer laid out for the CPU kernel, or None where the kernel does not apply: grouped
    convs, the flat layout, activation blocks that cut weight blocks, no kernel on this machine."""
    o, c, kh, kw = layer.layout.shape
    block, act_block = layer.weight_format.block, layer.act_format.block
    aligned = act_block == block or c <= min(block, act_block)
    if groups != 1 or layer.layout.kind != CHANNEL or not aligned or layer.vqk.device.type != "cpu":
        return None
    if cpu_kernel() is None:
        return None
    width = block_width(c, block)  # a block longer than the channels is all of them
    nb, taps, run, out = -(-c // width), kh * kw, -(-width // 4) * 4, -(-o // 16) * 16
    q = F.pad(layer.vqk.reshape(o, c, taps), (0, 0, 0, nb * width - c)).view(o, nb, width, taps)
    q = F.pad(_fit_last(q.permute(3, 1, 0, 2), run), (0, 0, 0, out - o)).short()  # (T, nb, O', run)
    alpha = F.pad(layer.kds.reshape(o, nb, taps).permute(2, 1, 0).float(), (0, out - o))
    if int(q.abs().max()) > 64:  # uint8 x int8 pair sums could pass 2^15: split q = 16 hi + lo
        lo = (q + 8) % 16 - 8
        q, alpha = torch.stack([(q - lo) // 16, lo], 2), torch.stack([alpha * 16, alpha], 2)
    else:
        q, alpha = q[:, :, None], alpha[:, :, None]
    chunk = 32767 // (2 * 255 * max(int(q.abs().max()), 1))  # vpmaddubsw pair sums, added `chunk` times
    weight = q.reshape(*q.shape[:3], out // 16, 16, run // 4, 4).transpose(-3, -2).to(torch.int8).contiguous()
    comp = 128 * q.sum(-1, dtype=torch.int32)
    return KernelPlan(weight, alpha.contiguous(), comp.contiguous(), run, chunk, o)


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


def _run_kernel(x: torch.Tensor, layer, kp: KernelPlan, bias, kernel=(1, 1), stride=(1, 1), dilation=(1, 1),
                pads=(0, 0, 0, 0), nchw: bool = True) -> torch.Tensor:
    """The CPU kernel on an input (N, C, H, W), zero-padded by `pads` (left, right, top, bottom):
    (N, O, OH, OW) float32, contiguous if `nchw`, else channels-last."""
    x = x.float()
    if not (x.stride(3) == 1 or x.stride(1) == 1):
        x = x.contiguous(memory_format=torch.contiguous_format if nchw else torch.channels_last)
    if bias is not None:
        bias = F.pad(bias.detach().float(), (0, kp.alpha.shape[-1] - kp.out_channels)).contiguous()
    fmt = layer.act_format
    out = cpu_kernel().conv(x, kp.weight, kp.alpha, kp.comp, bias, list(kernel), list(stride), list(dilation),
                            list(pads), fmt.bits, fmt.block, kp.chunk, FLOAT64_SUMS, nchw)
    # Dense like torch's own conv output: later float ops (BatchNorm) round a strided view differently.
    if nchw:
        return out[:, : kp.out_channels].contiguous()
    return out[..., : kp.out_channels].permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


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


def _accumulate(cols: torch.Tensor, steps: torch.Tensor, plan: Plan, bias) -> torch.Tensor:
    """Sum every unit's scaled integer dot products and the bias: (P, T, C') int8 mantissas and
    (P, T, nb) BFP steps at each output position and tap -> (P, O) float32."""
    p, g = cols.shape[0], plan.groups
    dtype = torch.float64 if FLOAT64_SUMS else torch.float32
    acc = torch.zeros(p, g, plan.units[0].alpha.shape[1], dtype=dtype, device=cols.device)
    for u in plan.units:
        a = cols[:, u.tap, : plan.in_channels].unflatten(1, (g, -1))[:, :, u.channels]
        step = steps[:, u.tap].index_select(1, u.act_block).to(dtype)  # (P, G)
        acc.addcmul_(_int_dot(a, u.weight) * step.unsqueeze(-1), u.alpha.to(dtype))  # int32 * 2^e: exact
    acc = acc.flatten(1)
    return (acc if bias is None else acc + bias.to(dtype)).float()


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
    pads = _padding(padding, kernel, dilation)
    # The result has F.conv2d's memory format (contiguous for a contiguous input, else channels-last),
    # so that the layers after it (BatchNorm, pooling) sum in the same order as after a simulated conv.
    nchw = input.is_contiguous()
    if plan.kernel is not None:
        if kernel == (1, 1) and not any(pads) and stride != (1, 1):  # encode only the pixels it reads
            input, stride = input[:, :, :: stride[0], :: stride[1]], (1, 1)
        return _run_kernel(input, layer, plan.kernel, bias, kernel, stride, dilation, pads, nchw)
    mant, step = _encode(F.pad(input, pads).permute(0, 2, 3, 1), layer.act_format)
    cols = _patches(mant, kernel, stride, dilation)
    steps = _patches(step, kernel, stride, dilation).flatten(0, 2)
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


_KERNEL_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>
#include <type_traits>

// out[p, o] = bias[o] + sum over taps t, blocks j and weight planes k of
//     alpha[t, j, k, o] * step[p + t, j] * sum_c (u[p + t, j, c] - 128) * q[t, j, k, c, o]
// (one plane, or two for 8-bit weights: q = 16 hi + lo, the hi plane with alpha * 16)
// with u = mantissa + 128 (uint8) and q the int8 VQK. vpmaddubsw multiplies u8 by s8 and adds
// pairs into int16 (exact: `chunk` steps of 4 channels stay below 2^15), vpmaddwd widens to int32,
// and 128 * sum_c q (`comp`) takes the offset out again: the dot product of each unit (tap, block)
// is exact. Its epilogue, one multiply by the power-of-two step (exact) and one fused multiply-add
// with alpha, happens in registers and L1, so no per-unit product ever reaches memory.
namespace {

constexpr int MR = 4;     // output positions that share each weight load
constexpr int RT = 8;     // groups of MR positions per tile, which share each unit's weights in L1
constexpr int NVMAX = 4;  // vectors of 16 output channels per tile

struct Args {
  const uint8_t* u;        // (N, Hp, Wp, nb * L)
  const float* step;       // (N, Hp, Wp, nb)
  const int8_t* w;         // (T, nb, planes, Op / 16, L / 4, 16, 4)
  const float* alpha;      // (T, nb, planes, Op)
  const int32_t* comp;     // (T, nb, planes, Op)
  const float* bias;       // (Op) or null
  const int64_t* tap_off;  // (T) pixel offset of each tap
  int64_t T, nb, planes, L, Op, chunk;
};

// acc[0 .. 16) += (dot - comp) * step * alpha[0 .. 16)
template <typename Acc>
inline void epilogue(Acc* acc, __m512i dot, __m512i comp, float step, const float* alpha) {
  const __m512i d = _mm512_sub_epi32(dot, comp);
  if constexpr (std::is_same<Acc, double>::value) {
    const __m512d sv = _mm512_set1_pd(step);
    const __m512d d0 = _mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(d, 0)), sv);
    const __m512d d1 = _mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(d, 1)), sv);
    _mm512_store_pd(acc, _mm512_fmadd_pd(d0, _mm512_cvtps_pd(_mm256_loadu_ps(alpha)), _mm512_load_pd(acc)));
    _mm512_store_pd(acc + 8, _mm512_fmadd_pd(d1, _mm512_cvtps_pd(_mm256_loadu_ps(alpha + 8)), _mm512_load_pd(acc + 8)));
  } else {
    const __m512 x = _mm512_mul_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(step));
    _mm512_store_ps(acc, _mm512_fmadd_ps(x, _mm512_loadu_ps(alpha), _mm512_load_ps(acc)));
  }
}

// The output positions of one tile: RT x MR of them (the last ones may repeat a valid one).
struct Rows {
  int64_t pix[RT * MR];  // the input pixel that tap 0 reads
  int64_t dst[RT * MR];  // where output channel 0 goes
  int64_t count;
};

// int16 sums of uint8 x int8 pair products of MR = 4 rows over groups of 4 channels k0 .. k1 - 1;
// `w` holds the unit's weights, NV vectors of `k4` groups.
// acc += x in int16 lanes, in place (GCC would add into another register and copy it back).
static inline void add16(__m512i& acc, __m512i x) { asm("vpaddw %1, %0, %0" : "+v"(acc) : "v"(x)); }

template <int NV>
inline void pair_sums(const uint8_t* const* x, const int8_t* w, int64_t k4, int64_t k0, int64_t k1,
                      __m512i (&sum)[MR][NV]) {
  __m512i s0[NV], s1[NV], s2[NV], s3[NV];
  for (int v = 0; v < NV; v++) s0[v] = s1[v] = s2[v] = s3[v] = _mm512_setzero_si512();
  for (int64_t k = k0; k < k1; k++) {
    const __m512i b0 = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x[0] + 4 * k));
    const __m512i b1 = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x[1] + 4 * k));
    const __m512i b2 = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x[2] + 4 * k));
    const __m512i b3 = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x[3] + 4 * k));
    for (int v = 0; v < NV; v++) {
      const __m512i wv = _mm512_loadu_si512(w + (v * k4 + k) * 64);
      add16(s0[v], _mm512_maddubs_epi16(b0, wv));
      add16(s1[v], _mm512_maddubs_epi16(b1, wv));
      add16(s2[v], _mm512_maddubs_epi16(b2, wv));
      add16(s3[v], _mm512_maddubs_epi16(b3, wv));
    }
  }
  for (int v = 0; v < NV; v++) sum[0][v] = s0[v], sum[1][v] = s1[v], sum[2][v] = s2[v], sum[3][v] = s3[v];
}

// One tile: RT x MR output positions by NV vectors of 16 output channels, summed over every unit
// (tap, block). Each unit's weights are read once per tile and reused by its RT row groups. K4:
// the unit's length in groups of 4 channels when known at compile time (one chunk), else 0.
template <int NV, typename Acc, int K4>
void tile(const Args& a, const Rows& rows, int64_t ov, float* out, int64_t ostride) {
  static_assert(MR == 4, "pair_sums handles 4 rows");
  const __m512i ones = _mm512_set1_epi16(1);
  const int64_t C = a.nb * a.L, k4 = K4 ? K4 : a.L / 4, groups = (rows.count + MR - 1) / MR;
  alignas(64) Acc acc[RT][MR][NV * 16];
  std::fill(&acc[0][0][0], &acc[0][0][0] + RT * MR * NV * 16, Acc(0));
  for (int64_t t = 0; t < a.T; t++) {
    for (int64_t jp = 0; jp < a.nb * a.planes; jp++) {
      const int64_t j = jp / a.planes, unit = t * a.nb * a.planes + jp;
      const int8_t* w = a.w + (unit * (a.Op / 16) + ov) * k4 * 64;
      const float* alpha = a.alpha + unit * a.Op + ov * 16;
      const int32_t* comp = a.comp + unit * a.Op + ov * 16;
      for (int64_t g = 0; g < groups; g++) {
        const uint8_t* x[MR];
        float s[MR];
        for (int r = 0; r < MR; r++) {
          const int64_t p = rows.pix[g * MR + r] + a.tap_off[t];
          x[r] = a.u + p * C + j * a.L;
          s[r] = a.step[p * a.nb + j];
        }
        __m512i sum[MR][NV], dot[MR][NV];
        if constexpr (K4 > 0) {  // one chunk: straight from the int16 sums to the epilogue
          pair_sums<NV>(x, w, k4, 0, K4, sum);
          for (int r = 0; r < MR; r++)
            for (int v = 0; v < NV; v++) dot[r][v] = _mm512_madd_epi16(sum[r][v], ones);
        } else {
          for (int r = 0; r < MR; r++)
            for (int v = 0; v < NV; v++) dot[r][v] = _mm512_setzero_si512();
          for (int64_t k0 = 0; k0 < k4; k0 += a.chunk) {
            pair_sums<NV>(x, w, k4, k0, std::min(k4, k0 + a.chunk), sum);
            for (int r = 0; r < MR; r++)
              for (int v = 0; v < NV; v++) dot[r][v] = _mm512_add_epi32(dot[r][v], _mm512_madd_epi16(sum[r][v], ones));
          }
        }
        for (int v = 0; v < NV; v++) {
          const __m512i cv = _mm512_loadu_si512(comp + v * 16);
          for (int r = 0; r < MR; r++) epilogue<Acc>(&acc[g][r][v * 16], dot[r][v], cv, s[r], alpha + v * 16);
        }
      }
    }
  }
  for (int64_t i = 0; i < rows.count; i++)
    for (int c = 0; c < NV * 16; c++) {
      const int64_t o = ov * 16 + c;
      const Acc b = a.bias ? static_cast<Acc>(a.bias[o]) : Acc(0);
      out[rows.dst[i] + o * ostride] = static_cast<float>(acc[i / MR][i % MR][c] + b);
    }
}

template <int NV, typename Acc>
void tile_any(const Args& a, const Rows& rows, int64_t ov, float* out, int64_t ostride) {
  const int64_t k4 = a.L / 4;
  if (k4 == 8 && a.chunk >= 8)
    tile<NV, Acc, 8>(a, rows, ov, out, ostride);
  else if (k4 == 4 && a.chunk >= 4)
    tile<NV, Acc, 4>(a, rows, ov, out, ostride);
  else
    tile<NV, Acc, 0>(a, rows, ov, out, ostride);
}

template <typename Acc>
void run(const Args& a, int64_t N, int64_t Hp, int64_t Wp, int64_t OH, int64_t OW, int64_t sh, int64_t sw, bool nchw,
         float* out) {
  const int64_t P = N * OH * OW, per_tile = RT * MR, row_tiles = (P + per_tile - 1) / per_tile, vectors = a.Op / 16;
  const int64_t col_tiles = (vectors + NVMAX - 1) / NVMAX, ostride = nchw ? OH * OW : 1;
  at::parallel_for(0, row_tiles * col_tiles, 1, [&](int64_t begin, int64_t end) {
    Rows rows;
    for (int64_t i = begin; i < end; i++) {
      const int64_t ct = i / row_tiles, p0 = (i % row_tiles) * per_tile;
      rows.count = std::min<int64_t>(per_tile, P - p0);
      for (int64_t r = 0; r < per_tile; r++) {
        const int64_t p = p0 + (r < rows.count ? r : 0), n = p / (OH * OW), oy = p / OW % OH, ox = p % OW;
        rows.pix[r] = (n * Hp + oy * sh) * Wp + ox * sw;
        rows.dst[r] = nchw ? (n * a.Op * OH + oy) * OW + ox : p * a.Op;
      }
      const int64_t ov = ct * NVMAX;
      switch (std::min<int64_t>(NVMAX, vectors - ov)) {
        case 4: tile_any<4, Acc>(a, rows, ov, out, ostride); break;
        case 3: tile_any<3, Acc>(a, rows, ov, out, ostride); break;
        case 2: tile_any<2, Acc>(a, rows, ov, out, ostride); break;
        default: tile_any<1, Acc>(a, rows, ov, out, ostride); break;
      }
    }
  });
}

}  // namespace

// The BFP steps of 16 blocks whose peaks are in `peak`: 2^(e - (bits - 1)) with e the frexp
// exponent of the peak (floor(log2 peak) + 1; 0 for a zero peak), as dsq.formats.bfp does it.
static inline __m512 bfp_steps(__m512 peak, int64_t bits) {
  const __m512 k = _mm512_add_ps(_mm512_getexp_ps(peak), _mm512_set1_ps(static_cast<float>(2 - bits)));
  const __m512 s = _mm512_scalef_ps(_mm512_set1_ps(1.f), k);
  const __mmask16 zero = _mm512_cmp_ps_mask(peak, _mm512_setzero_ps(), _CMP_EQ_OQ);
  return _mm512_mask_blend_ps(zero, s, _mm512_set1_ps(std::ldexp(1.f, static_cast<int>(1 - bits))));
}

// uint8 mantissas + 128 of 16 values x with steps s: x / s rounded half to even, clamped to +-lim.
// x / s is x * (1 / s), exactly, where 1 / s is a float (s >= 2^-126): no division then.
static inline __m128i bfp_mantissas(__m512 x, __m512 s, __m512 lim) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(s, _mm512_set1_ps(std::ldexp(1.f, -126)), _CMP_LT_OQ);
  const __m512 q = tiny ? _mm512_div_ps(x, s) : _mm512_mul_ps(x, _mm512_div_ps(_mm512_set1_ps(1.f), s));
  __m512 m = _mm512_roundscale_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  m = _mm512_min_ps(_mm512_max_ps(m, _mm512_sub_ps(_mm512_setzero_ps(), lim)), lim);
  return _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(m), _mm512_set1_epi32(128)));
}

static inline __mmask16 first(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }

// BFP encoding of a float32 input (N, C, H, W), as dsq.formats.bfp_encode does it (per block of
// channels at each pixel: e = frexp exponent of the peak, step = 2^(e - (bits - 1)), mantissa =
// x / step rounded half to even and clamped), written the way the kernel reads it: channels-last
// uint8 mantissa + 128 (N, Hp, Wp, nb * run), `run` channels per block (128 past the channels),
// and steps (N, Hp, Wp, nb), zero-padded by `pads` pixels (left, right, top, bottom). One pass: a
// contiguous (NCHW) input is read along its rows, 16 pixels at a time, a channels-last one along
// its channels.
void encode(const torch::Tensor& x, int64_t bits, int64_t block, int64_t run, const std::vector<int64_t>& pads,
            uint8_t* up, float* sp) {
  TORCH_CHECK(x.dtype() == torch::kFloat && x.dim() == 4, "x: (N, C, H, W) float32");
  TORCH_CHECK(pads.size() == 4 && bits >= 2 && bits <= 8 && block > 0 && run >= std::min(block, x.size(1)),
              "arguments");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), nb = (C + block - 1) / block;
  const int64_t sn = x.stride(0), sc = x.stride(1), sy = x.stride(2), sx = x.stride(3);
  TORCH_CHECK(sx == 1 || sc == 1, "x: contiguous or channels-last");
  const int64_t Hp = H + pads[2] + pads[3], Wp = W + pads[0] + pads[1], D = nb * run;
  const float* xp = x.data_ptr<float>();
  const __m512 lim = _mm512_set1_ps(static_cast<float>((1 << (bits - 1)) - 1));
  const bool rows = sx == 1 && (sc != 1 || W > 1);
  at::parallel_for(0, N * Hp, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i++) {
      const int64_t n = i / Hp, y = i % Hp - pads[2], o0 = i * Wp + pads[0];
      if (y < 0 || y >= H) {  // a padding row
        std::memset(up + i * Wp * D, 128, Wp * D);
        std::fill(sp + i * Wp * nb, sp + (i + 1) * Wp * nb, 0.f);
        continue;
      }
      std::memset(up + i * Wp * D, 128, pads[0] * D);
      std::memset(up + (o0 + W) * D, 128, pads[1] * D);
      std::fill(sp + i * Wp * nb, sp + o0 * nb, 0.f);
      std::fill(sp + (o0 + W) * nb, sp + (i + 1) * Wp * nb, 0.f);
      const float* row = xp + n * sn + y * sy;
      for (int64_t j = 0; j < nb; j++) {
        const int64_t c0 = j * block, c1 = std::min(C, c0 + block);
        if (c1 - c0 < run)
          for (int64_t w = 0; w < W; w++) std::memset(up + (o0 + w) * D + j * run + c1 - c0, 128, run - (c1 - c0));
        if (rows) {  // 16 pixels of a row at a time
          for (int64_t w0 = 0; w0 < W; w0 += 16) {
            const __mmask16 mask = first(W - w0);
            const int64_t count = std::min<int64_t>(16, W - w0);
            __m512 peak = _mm512_setzero_ps();
            for (int64_t c = c0; c < c1; c++)
              peak = _mm512_max_ps(peak, _mm512_abs_ps(_mm512_maskz_loadu_ps(mask, row + c * sc + w0)));
            const __m512 s = bfp_steps(peak, bits);
            alignas(64) float sv[16];
            _mm512_store_ps(sv, s);
            for (int64_t w = 0; w < count; w++) sp[(o0 + w0 + w) * nb + j] = sv[w];
            for (int64_t c = c0; c < c1; c++) {
              alignas(16) uint8_t m[16];
              _mm_store_si128(reinterpret_cast<__m128i*>(m),
                              bfp_mantissas(_mm512_maskz_loadu_ps(mask, row + c * sc + w0), s, lim));
              uint8_t* dst = up + (o0 + w0) * D + j * run + c - c0;
              for (int64_t w = 0; w < count; w++) dst[w * D] = m[w];
            }
          }
        } else {  // channels-last: one pixel at a time, 16 channels at a time
          for (int64_t w = 0; w < W; w++) {
            const float* px = row + w * sx;
            __m512 peak = _mm512_setzero_ps();
            for (int64_t c = c0; c < c1; c += 16)
              peak = _mm512_max_ps(peak, _mm512_abs_ps(_mm512_maskz_loadu_ps(first(c1 - c), px + c)));
            const __m512 st = bfp_steps(_mm512_set1_ps(_mm512_reduce_max_ps(peak)), bits);
            sp[(o0 + w) * nb + j] = _mm512_cvtss_f32(st);
            for (int64_t c = c0; c < c1; c += 16)
              _mm_mask_storeu_epi8(up + (o0 + w) * D + j * run + c - c0, first(c1 - c),
                                   bfp_mantissas(_mm512_maskz_loadu_ps(first(c1 - c), px + c), st, lim));
          }
        }
      }
    }
  });
}

std::tuple<torch::Tensor, torch::Tensor> bfp_encode_u8(const torch::Tensor& x, int64_t bits, int64_t block,
                                                       int64_t run, std::vector<int64_t> pads) {
  const int64_t nb = (x.size(1) + block - 1) / block, Hp = x.size(2) + pads[2] + pads[3];
  const int64_t Wp = x.size(3) + pads[0] + pads[1];
  auto u = torch::empty({x.size(0), Hp, Wp, nb * run}, x.options().dtype(torch::kUInt8));
  auto step = torch::empty({x.size(0), Hp, Wp, nb}, x.options());
  encode(x, bits, block, run, pads, u.data_ptr<uint8_t>(), step.data_ptr<float>());
  return {u, step};
}

// The encoded input of the last call from this thread, kept for the next one.
std::vector<uint8_t>& thread_workspace() {
  thread_local std::vector<uint8_t> workspace;
  return workspace;
}

int64_t workspace_bytes() { return static_cast<int64_t>(thread_workspace().capacity()); }

void release_workspace() { std::vector<uint8_t>().swap(thread_workspace()); }

// A DSConv layer on integers: BFP-encode x (N, C, H, W) into a workspace that is kept from call
// to call (no fresh pages to fault in), then the kernel. Returns (N, O', OH, OW) if `nchw`, else
// (N, OH, OW, O'), float32.
torch::Tensor conv(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& alpha,
                   const torch::Tensor& comp,
                   const c10::optional<torch::Tensor>& bias, std::vector<int64_t> kernel, std::vector<int64_t> stride,
                   std::vector<int64_t> dilation, std::vector<int64_t> pads, int64_t bits, int64_t act_block,
                   int64_t chunk, bool float64, bool nchw) {
  TORCH_CHECK(w.dtype() == torch::kInt8 && w.is_contiguous() && alpha.is_contiguous() && comp.is_contiguous() &&
              alpha.dtype() == torch::kFloat && comp.dtype() == torch::kInt, "plan tensors");
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && dilation.size() == 2 && pads.size() == 4, "arguments");
  const int64_t N = x.size(0), Hp = x.size(2) + pads[2] + pads[3], Wp = x.size(3) + pads[0] + pads[1];
  const int64_t kh = kernel[0], kw = kernel[1], sh = stride[0], sw = stride[1], dh = dilation[0], dw = dilation[1];
  TORCH_CHECK(alpha.dim() == 4 && comp.sizes() == alpha.sizes(), "plan shapes");
  Args a{nullptr, nullptr, w.data_ptr<int8_t>(), alpha.data_ptr<float>(), comp.data_ptr<int32_t>(), nullptr, nullptr,
         alpha.size(0), alpha.size(1), alpha.size(2), w.numel() / alpha.numel(), alpha.size(3), chunk};
  TORCH_CHECK(a.L % 4 == 0 && a.Op % 16 == 0 && a.T == kh * kw && chunk > 0, "plan shapes");
  TORCH_CHECK((x.size(1) + act_block - 1) / act_block == a.nb, "activation blocks must match the weight blocks");
  if (bias && bias->defined()) {
    TORCH_CHECK(bias->dtype() == torch::kFloat && bias->is_contiguous() && bias->numel() == a.Op, "bias");
    a.bias = bias->data_ptr<float>();
  }
  std::vector<uint8_t>& workspace = thread_workspace();
  const size_t u_bytes = (N * Hp * Wp * a.nb * a.L + 63) / 64 * 64, need = u_bytes + N * Hp * Wp * a.nb * sizeof(float);
  if (workspace.size() < need) workspace.resize(need);
  a.u = workspace.data();
  a.step = reinterpret_cast<float*>(workspace.data() + u_bytes);
  encode(x, bits, act_block, a.L, pads, workspace.data(), reinterpret_cast<float*>(workspace.data() + u_bytes));
  const int64_t OH = (Hp - dh * (kh - 1) - 1) / sh + 1, OW = (Wp - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK(OH > 0 && OW > 0, "the input is smaller than the kernel");
  std::vector<int64_t> tap_off(a.T);
  for (int64_t t = 0; t < a.T; t++) tap_off[t] = (t / kw) * dh * Wp + (t % kw) * dw;
  a.tap_off = tap_off.data();
  auto out = nchw ? torch::empty({N, a.Op, OH, OW}, alpha.options()) : torch::empty({N, OH, OW, a.Op}, alpha.options());
  if (float64)
    run<double>(a, N, Hp, Wp, OH, OW, sh, sw, nchw, out.data_ptr<float>());
  else
    run<float>(a, N, Hp, Wp, OH, OW, sh, sw, nchw, out.data_ptr<float>());
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("conv", &conv);
  m.def("bfp_encode_u8", &bfp_encode_u8);
  m.def("workspace_bytes", &workspace_bytes);
  m.def("release_workspace", &release_workspace);
}
"""
