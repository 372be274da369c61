"""`dsq.BFP`: dsq's block floating point rounding (method §3) as ONNX local functions, built from
standard opset-21 ops only, so that any ONNX runtime runs them without a custom-op library.

    x (N, C, ...) -> blocks of min(block, C) channels at each position -> e = floor(log2(max |x|))
    per block -> step = 2^(e - (bits - 2)), at least the smallest float32 ->
    clip(round_half_even(x / step), -(2^(bits-1) - 1), 2^(bits-1) - 1) * step

`BFP` takes inputs whose channels fill whole blocks; `BFPRagged` pads the last block with zeros
first and drops the padding after (a copy each way, so the exporter calls it only where C is not
a multiple of the block). Both compute the step with `BlockStep`.

ONNX has no log2 and no frexp: e comes from Log(peak) / ln 2, floored, then compared both ways
against the exact power of two p = Pow(2, e), which puts a peak that Log rounded across a power
of two back where dsq puts it (dsq.formats.bfp.floor_log2 does the same in torch). A block of
zeros, NaN or infinity takes e = -1, as in dsq. Pow runs once (it is slow in onnxruntime): the
corrections halve or double p, and the step is p times the power of two 2^-(bits - 2), both exact.
The mantissa is clipped first and then rounded by adding and subtracting ROUNDER (exact for the
at most 8-bit mantissas; clipping first keeps infinities at the range's end, as Round then Clip does).
"""

from __future__ import annotations

import onnxscript
from onnxscript import FLOAT
from onnxscript import opset21 as op

DOMAIN = "dsq"
DOMAIN_VERSION = 1
DSQ = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)
LN2 = 0.6931471805599453
# 1.5 * 2^23: for |v| <= 2^22, (v + ROUNDER) - ROUNDER is v rounded half to even in float32 (the sum
# lies where float32 steps by 1), in two fast passes where onnxruntime's Round is slow
ROUNDER = 12582912.0
LARGEST_EXPONENT = 127.0  # of a finite float32: Log may put the largest floats at 128, where Pow gives infinity
SMALLEST_STEP = 2.0**-149  # the smallest float32 (subnormal): every float32 is a whole multiple of it


@onnxscript.script(DSQ, default_opset=op)
def BlockStep(peak: FLOAT, bits: int) -> FLOAT:
    """The BFP step 2^(floor(log2 peak) - (bits - 2)) of each block's peak |x|."""
    two = op.Constant(value_float=2.0)
    e = op.Min(op.Floor(op.Div(op.Log(peak), op.Constant(value_float=LN2))), op.Constant(value_float=LARGEST_EXPONENT))
    live = op.And(op.Greater(peak, op.Constant(value_float=0.0)), op.Not(op.IsInf(peak)))
    p = op.Pow(two, op.Where(live, e, op.Constant(value_float=-1.0)))
    p = op.Where(op.And(live, op.Greater(p, peak)), op.Div(p, two), p)
    p = op.Where(op.And(live, op.LessOrEqual(op.Mul(p, two), peak)), op.Mul(p, two), p)
    shift = op.Pow(two, op.Cast(op.Constant(value_int=bits), to=FLOAT.dtype) - two)
    return op.Max(op.Div(p, shift), op.Constant(value_float=SMALLEST_STEP))


@onnxscript.script(DSQ, default_opset=op)
def RoundToStep(blocks: FLOAT, step: FLOAT, bits: int) -> FLOAT:
    """Each value rounded to its block's step, half to even, within the bits-bit mantissa range."""
    one = op.Constant(value_float=1.0)
    lim = op.Pow(op.Constant(value_float=2.0), op.Cast(op.Constant(value_int=bits), to=FLOAT.dtype) - one) - one
    mantissa = op.Clip(op.Div(blocks, step), op.Neg(lim), lim)
    rounder = op.Constant(value_float=ROUNDER)
    return op.Mul(op.Sub(op.Add(mantissa, rounder), rounder), step)


@onnxscript.script(DSQ, default_opset=op)
def BFP(x: FLOAT, bits: int, block: int) -> FLOAT:
    n = op.Shape(x, start=0, end=1)
    c = op.Shape(x, start=1, end=2)
    width = op.Min(op.Constant(value_int=block), c)
    blocks = op.Reshape(x, op.Concat(n, op.Div(c, width), width, op.Constant(value_ints=[-1]), axis=0))
    peak = op.ReduceMax(op.Abs(blocks), op.Constant(value_ints=[2]), keepdims=1)
    return op.Reshape(RoundToStep(blocks, BlockStep(peak, bits=bits), bits=bits), op.Shape(x))


@onnxscript.script(DSQ, default_opset=op)
def BFPRagged(x: FLOAT, bits: int, block: int) -> FLOAT:
    n = op.Shape(x, start=0, end=1)
    c = op.Shape(x, start=1, end=2)
    width = op.Min(op.Constant(value_int=block), c)
    nb = op.Div(c + width - op.Constant(value_ints=[1]), width)
    zero = op.Constant(value_ints=[0])
    rest = op.Constant(value_ints=[-1])
    flat = op.Reshape(x, op.Concat(n, c, rest, axis=0))
    padded = op.Pad(flat, op.Concat(zero, zero, zero, zero, nb * width - c, zero, axis=0))
    blocks = op.Reshape(padded, op.Concat(n, nb, width, rest, axis=0))
    peak = op.ReduceMax(op.Abs(blocks), op.Constant(value_ints=[2]), keepdims=1)
    rounded = RoundToStep(blocks, BlockStep(peak, bits=bits), bits=bits)
    kept = op.Slice(op.Reshape(rounded, op.Shape(padded)), zero, c, op.Constant(value_ints=[1]))
    return op.Reshape(kept, op.Shape(x))


FUNCTIONS = (BlockStep, RoundToStep, BFP, BFPRagged)


def function_protos() -> list:
    """Every function a graph with BFP calls needs (callees first)."""
    return [f.to_function_proto() for f in FUNCTIONS]


def function_name(channels: int, block: int) -> str:
    """BFP where the channels fill whole blocks, else BFPRagged."""
    return "BFP" if channels % min(block, channels) == 0 else "BFPRagged"
