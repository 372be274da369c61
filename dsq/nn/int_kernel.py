"""The int backend's kernel as torch.library ops (docs/integer-backend.md).

- `dsq::int_conv`: a DSConv conv on integers from a layer's packed plan (dsq.nn.int_plan): the
  input BFP-encoded per block of channels at each pixel, every unit (tap, block, weight plane)
  an exact int32 dot product, scaled by its power-of-two step and its KDS value and summed in
  float64, then the output epilogue (dsq.nn.epilogue: bias, folded BatchNorm, rounding to
  float32, residual, activation clamp).
- `dsq::bfp_encode_u8`: the BFP encoding that int_conv reads: uint8 mantissa + 128, channels-last,
  each block padded to `run` channels, and the steps, zero-padded by `pads` pixels.
- `dsq::bfp_round`: BFP rounding along the channels, returned as floats in one pass (what the
  simulated backend does to a layer's input).
- `dsq::finish_f64`: the output epilogue (folded BatchNorm, rounding to float32, residual, clamp)
  on a float64 conv output, in one pass (what the exact backend, and int for a float input, end in).

Each has an eager reference implementation here (torch ops, any device) and a meta one (shapes
only). The CPU implementations are C++ in dsq/nn/csrc (int_conv.cpp, and int_tile.h compiled for
AVX-512BW, for AVX-512 VNNI and for AMX-INT8): compiled on first use (about a minute) by
torch.utils.cpp_extension under a name that holds the torch version and the sources' hash, so
that an upgrade of either builds afresh, and cached under TORCH_EXTENSIONS_DIR. Loading it
registers them for CPU tensors, over the references, together with `dsq::int_isas` (the
instruction sets whose tiles run here), `dsq::int_workspace_bytes` and
`dsq::release_int_workspace` (the encoded input it keeps per thread from call to call).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ..formats import ActFormat, bfp_encode, bfp_quantize
from .epilogue import Epilogue
from .geometry import output_size, patches

SOURCE = Path(__file__).with_name("csrc") / "int_conv.cpp"
SOURCES = (SOURCE, SOURCE.with_name("int_tile.h"))
# No contraction of a * b + c into one rounding: the output epilogue rounds as its torch reference does.
_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma", "-ffp-contract=off"]
_built: bool | None = None  # whether the C++ kernel is loaded; None until first asked

_LIB = torch.library.Library("dsq", "FRAGMENT")
_LIB.define(
    "int_conv(Tensor x, Tensor weight, Tensor alpha, Tensor comp, Tensor? bias, int[] kernel, int[] stride, "
    "int[] dilation, int[] pads, int bits, int act_block, int chunk, bool nchw, Tensor? scale, Tensor? shift, "
    "Tensor? residual, float lo, float hi, str isa) -> Tensor"
)
_LIB.define("bfp_encode_u8(Tensor x, int bits, int block, int run, int[] pads) -> (Tensor, Tensor)")
_LIB.define("bfp_round(Tensor x, int bits, int block) -> Tensor")
_LIB.define("finish_f64(Tensor acc, Tensor? scale, Tensor? shift, Tensor? residual, float lo, float hi) -> Tensor")


def cpu_kernel_available() -> bool:
    """Whether the C++ kernel runs here, building or loading it on the first call. Not where
    DSQ_INT_KERNEL=0, on a CPU without AVX-512 (F, BW, DQ, VL), or without a C++ compiler (then
    with a warning, once)."""
    global _built
    if os.environ.get("DSQ_INT_KERNEL", "1") == "0":
        return False
    if _built is None:
        _built = torch.backends.cpu.get_cpu_capability() == "AVX512" and _build()
    return _built


def rounds_bfp_fast(x: torch.Tensor, dim: int) -> bool:
    """Whether dsq::bfp_round's C++ kernel rounds `x` to BFP along `dim` in one pass: a float32
    CPU tensor (N, C, ...) rounded along its channels, contiguous or channels-last."""
    dense = x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() >= 2
        and dim % x.dim() == 1
        and dense
        and cpu_kernel_available()
    )


def kernel_isas() -> list[str]:
    """The instruction sets whose tiles the C++ kernel runs with on this CPU, best last
    ("avx512bw", then "vnni" where the CPU has AVX-512 VNNI, then "amx" where it has AMX-INT8 and
    the OS lets this process use it); none without the kernel."""
    return list(torch.ops.dsq.int_isas()) if cpu_kernel_available() else []


def build_name(flags: list[str] = _FLAGS) -> str:
    """The extension's name: the torch version and the sources' and flags' hash, so either change rebuilds."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + " ".join(flags).encode()).hexdigest()[:12]
    return f"dsq_int_kernel_{re.sub(r'[^0-9A-Za-z]', '_', torch.__version__)}_{digest}"


def _build() -> bool:
    """Compile and load dsq/nn/csrc/int_conv.cpp (once: torch caches the build); if that fails,
    once more without the AMX tiles (a toolchain that lacks them)."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)  # its import says "No CUDA runtime is found", which does not matter here
    try:
        from torch.utils.cpp_extension import load

        for flags in (_FLAGS, [*_FLAGS, "-DDSQ_NO_AMX"]):
            try:
                load(
                    build_name(flags),
                    [str(SOURCE)],
                    extra_cflags=flags,
                    extra_ldflags=["-fopenmp"],
                    is_python_module=False,
                )
                return True
            except Exception as e:  # noqa: BLE001 - any build failure means: run on the eager path
                error = e
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(
            f"dsq: the int backend's CPU kernel could not be built ({reason}); "
            "the int backend runs on its slower eager path",
            RuntimeWarning,
            stacklevel=4,
        )
        return False
    finally:
        log.setLevel(level)


def fit_last(t: torch.Tensor, length: int, value: int = 0) -> torch.Tensor:
    """`t` cut or padded with `value` to `length` along its last axis."""
    extra = length - t.shape[-1]
    return F.pad(t, (0, extra), value=value) if extra > 0 else t[..., :length]


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for int8 matrices, summed exactly in int32 by torch._int_mm.

    The CPU takes any shape. CUDA wants more than 16 rows and inner and output widths that are
    multiples of 8: zero padding, which adds nothing to any sum, makes every shape fit.
    """
    (m, k), n = a.shape, b.shape[1]
    if a.device.type == "cuda" and (m <= 16 or k % 8 or n % 8):
        a, b = F.pad(a, (0, -k % 8, 0, max(17 - m, 0))), F.pad(b, (0, -n % 8, 0, -k % 8))
        return torch._int_mm(a, b)[:m, :n]
    return torch._int_mm(a, b)


def bfp_encode_u8_reference(x: torch.Tensor, bits: int, block: int, run: int, pads: list[int]):
    """dsq::bfp_encode_u8 in torch ops: (N, C, H, W) float32 -> uint8 mantissas + 128
    (N, Hp, Wp, nb * run) and steps (N, Hp, Wp, nb), padded by `pads` (left, right, top, bottom)."""
    mant, step = bfp_encode(x.permute(0, 2, 3, 1), ActFormat(bits, block), dim=-1)
    mant = F.pad(fit_last(mant.int() + 128, run, 128), (0, 0, 0, 0, *pads), value=128)
    return mant.flatten(-2).to(torch.uint8), F.pad(step.squeeze(-1), (0, 0, *pads))


def int_conv_reference(
    x, weight, alpha, comp, bias, kernel, stride, dilation, pads, bits, act_block, chunk, nchw, *epilogue_and_isa
):
    """dsq::int_conv in torch ops, unit by unit in the kernel's order (so bit for bit the same).
    `comp`, `chunk` and `isa` only serve the C++ kernel."""
    scale, shift, residual, lo, hi, _ = epilogue_and_isa
    taps, nb, planes, out = alpha.shape
    run = weight.shape[-3] * 4
    u, step = bfp_encode_u8_reference(x.float(), bits, act_block, run, pads)
    cols = patches((u.int() - 128).to(torch.int8), kernel, stride, dilation)  # (N, OH, OW, T, nb * run)
    steps = patches(step, kernel, stride, dilation).flatten(0, 2).double()  # (P, T, nb)
    cols = cols.flatten(0, 2).unflatten(-1, (nb, run))
    q = weight.transpose(-3, -2).reshape(taps, nb, planes, out, run)
    acc = torch.zeros(cols.shape[0], out, dtype=torch.float64, device=x.device)
    for t in range(taps):
        for j in range(nb):
            for k in range(planes):
                dot = int_matmul(cols[:, t, j].contiguous(), q[t, j, k].T.contiguous())
                acc.addcmul_(dot * steps[:, t, j, None], alpha[t, j, k].double())  # int32 * 2^e * alpha: exact
    acc = acc.view(x.shape[0], *_output_size(x, kernel, stride, dilation, pads), out)
    residual = None if residual is None else residual.permute(0, 2, 3, 1) if nchw else residual
    result = Epilogue(scale, shift, lo, hi).apply(acc, bias, residual, channel_dim=-1)
    return result.permute(0, 3, 1, 2).contiguous() if nchw else result


def bfp_round_reference(x: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """dsq::bfp_round in torch ops: dsq.formats.bfp_quantize along the channels (dim 1)."""
    return bfp_quantize(x, ActFormat(bits, block), dim=1)


def finish_f64_reference(acc, scale, shift, residual, lo, hi) -> torch.Tensor:
    """dsq::finish_f64 in torch ops: Epilogue.apply on float64 sums (N, C, H, W), no bias."""
    return Epilogue(scale, shift, lo, hi).apply(acc, None, residual)


def _output_size(x: torch.Tensor, kernel, stride, dilation, pads) -> tuple[int, int]:
    """(OH, OW) of a conv on `x` (N, C, H, W) padded by `pads` (left, right, top, bottom)."""
    return output_size(x.shape[2] + pads[2] + pads[3], x.shape[3] + pads[0] + pads[1], kernel, stride, dilation)


def _int_conv_meta(x, weight, alpha, comp, bias, kernel, stride, dilation, pads, bits, act_block, chunk, nchw, *rest):
    n, (oh, ow) = x.shape[0], _output_size(x, kernel, stride, dilation, pads)
    shape = (n, alpha.shape[-1], oh, ow) if nchw else (n, oh, ow, alpha.shape[-1])
    return x.new_empty(shape, dtype=torch.float32)


def _bfp_encode_u8_meta(x, bits, block, run, pads):
    n, c, h, w = x.shape
    hp, wp, nb = h + pads[2] + pads[3], w + pads[0] + pads[1], -(-c // block)
    return x.new_empty((n, hp, wp, nb * run), dtype=torch.uint8), x.new_empty((n, hp, wp, nb), dtype=torch.float32)


_LIB.impl("int_conv", int_conv_reference, "CompositeExplicitAutograd")
_LIB.impl("bfp_encode_u8", bfp_encode_u8_reference, "CompositeExplicitAutograd")
_LIB.impl("bfp_round", bfp_round_reference, "CompositeExplicitAutograd")
_LIB.impl("finish_f64", finish_f64_reference, "CompositeExplicitAutograd")
_LIB.impl("int_conv", _int_conv_meta, "Meta")
_LIB.impl("bfp_encode_u8", _bfp_encode_u8_meta, "Meta")
_LIB.impl("bfp_round", lambda x, bits, block: torch.empty_like(x), "Meta")
_LIB.impl("finish_f64", lambda acc, *rest: torch.empty_like(acc, dtype=torch.float32), "Meta")
