"""Block floating point activations against the spec's per-block formulas."""

from __future__ import annotations

import math

import pytest
import torch

from dsq.formats import ActFormat, bfp_encode, bfp_quantize, unblocked
from dsq.formats.bfp import floor_log2

from zoo import ref_bfp


def _activations(n, c, h, w, seed=0):
    """Random activations spanning many binades, with some all-zero blocks and exact powers of 2."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g) * torch.exp2(torch.randint(-12, 12, (n, 1, h, w), generator=g).float())
    x[0, :, 0, 0] = 0  # a whole position zero: every block there is all-zero
    if c > 4:
        x[-1, : min(c, 4), -1, -1] = 0
    x[0, 0, -1, 0] = 4.0  # exact power of two
    x[0, 1 % c, -1, 0] = -0.5
    return x


CASES = [(5, 1), (5, 4), (5, 8), (32, 32), (40, 32), (64, 32), (3, 32), (24, 64), (17, 5)]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("c,block", CASES)
def test_bfp_quantize_matches_reference(c, block, bits):
    x = _activations(2, c, 3, 4, seed=c * 100 + block)
    got = bfp_quantize(x, ActFormat(bits=bits, block=block))
    assert got.shape == x.shape and got.dtype == x.dtype
    assert torch.equal(got, ref_bfp(x, bits, block))


@pytest.mark.parametrize("bits", [3, 8])
@pytest.mark.parametrize("c,block", [(40, 32), (5, 8), (9, 1)])
def test_bfp_along_last_dim(c, block, bits):
    x = _activations(2, c, 3, 4, seed=7).permute(0, 2, 3, 1).reshape(-1, c)
    fmt = ActFormat(bits=bits, block=block)
    expected = ref_bfp(x, bits, block, dim=-1)
    assert torch.equal(bfp_quantize(x, fmt, dim=-1), expected)
    assert torch.equal(bfp_quantize(x, fmt, dim=1), expected)
    assert torch.equal(bfp_quantize(x.T.contiguous(), fmt, dim=0).T, expected)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("c,block", CASES)
def test_block_max_uses_top_mantissa_bit(c, block, bits):
    x = _activations(2, c, 3, 4, seed=3)
    mant, step = bfp_encode(x, ActFormat(bits=bits, block=block))
    peak_mant = mant.abs().amax(dim=2)  # (N, nb, H, W)
    peak_x = torch.zeros_like(peak_mant, dtype=x.dtype)
    for j in range(peak_mant.shape[1]):
        peak_x[:, j] = x[:, j * block : (j + 1) * block].abs().amax(dim=1)
    nonzero = peak_x > 0
    # 2^(m-2) <= |mant of the block max| <= 2^(m-1) - 1
    assert torch.all(peak_mant[nonzero] >= 2 ** (bits - 2))
    assert torch.all(peak_mant[nonzero] <= 2 ** (bits - 1) - 1)
    assert torch.all(peak_mant[~nonzero] == 0)


def test_all_zero_blocks_stay_zero():
    x = torch.randn(2, 64, 3, 3)
    x[:, 32:] = 0
    x[1, :, 2, 2] = 0
    out = bfp_quantize(x, ActFormat(bits=8, block=32))
    assert torch.all(out[:, 32:] == 0)
    assert torch.all(out[1, :, 2, 2] == 0)
    assert torch.isfinite(out).all()
    assert torch.equal(bfp_quantize(torch.zeros(1, 5, 2, 2), ActFormat(bits=4, block=2)), torch.zeros(1, 5, 2, 2))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("c,block", CASES)
def test_encode_mantissas_and_steps(c, block, bits):
    x = _activations(2, c, 3, 4, seed=11)
    fmt = ActFormat(bits=bits, block=block)
    mant, step = bfp_encode(x, fmt)
    nb = -(-c // block)
    assert mant.dtype == torch.int8
    assert mant.shape == (2, nb, min(block, c), 3, 4)  # a block longer than the channels is the channels
    assert step.shape == (2, nb, 1, 3, 4)  # one exponent per (n, block, h, w)
    lim = 2 ** (bits - 1) - 1
    assert int(mant.min()) >= -lim and int(mant.max()) <= lim
    # steps are powers of two: s = 2^(e - (m - 2)), e = floor(log2 max|x|) over the block
    assert torch.all(torch.exp2(torch.log2(step).round()) == step)
    for j in range(nb):
        peak = x[:, j * block : (j + 1) * block].abs().amax(dim=1)
        for idx in torch.nonzero(peak > 0).tolist():
            n, h, w = idx
            e = math.floor(math.log2(peak[n, h, w].item()))
            assert step[n, j, 0, h, w].item() == 2.0 ** (e - (bits - 2)), (n, j, h, w)
    # mant * step is bfp_quantize (padding dropped)
    assert torch.equal(unblocked(mant.float() * step, 1, c), bfp_quantize(x, fmt))
    assert torch.all(mant[:, -1, c - (nb - 1) * block :] == 0)  # padding of a ragged last block


def test_exponent_is_shared_per_n_block_h_w_only():
    x = torch.rand(2, 64, 4, 4) + 0.5
    fmt = ActFormat(bits=4, block=32)
    base = bfp_quantize(x, fmt)
    y = x.clone()
    y[1, 40, 2, 3] = 1000.0  # one huge value: only block 1 at (n=1, h=2, w=3) changes exponent
    out = bfp_quantize(y, fmt)
    changed = out != base
    changed[1, 40, 2, 3] = False
    where = torch.nonzero(changed)
    assert len(where) > 0
    assert torch.all(where[:, 0] == 1) and torch.all(where[:, 2] == 2) and torch.all(where[:, 3] == 3)
    assert torch.all((where[:, 1] >= 32) & (where[:, 1] < 64))
    # with 4-bit mantissas and max 1000, values below ~1000/2^3/2 round to zero in that block
    assert torch.all(out[1, 32:64, 2, 3][torch.arange(32) != 8] == 0)


def test_m8_relative_error_on_block_max():
    x = torch.randn(4, 96, 5, 5) * torch.exp2(torch.randint(-20, 20, (4, 96, 5, 5)).float() / 4)
    out = bfp_quantize(x, ActFormat(bits=8, block=32))
    err = (out - x).abs()
    for j in range(3):
        sl = slice(32 * j, 32 * (j + 1))
        peak = x[:, sl].abs().amax(dim=1, keepdim=True)
        assert torch.all(err[:, sl] < 2**-6 * peak)


def test_idempotent():
    """A BFP value is its own BFP: the block max keeps its exponent, every value is a step multiple."""
    x = torch.randn(3, 40, 4, 4) * 3
    for bits in (2, 4, 8):
        fmt = ActFormat(bits=bits, block=16)
        once = bfp_quantize(x, fmt)
        assert torch.equal(bfp_quantize(once, fmt), once)


def test_does_not_modify_input():
    x = torch.randn(2, 40, 3, 3)
    before = x.clone()
    bfp_quantize(x, ActFormat())
    bfp_encode(x, ActFormat())
    assert torch.equal(x, before)


def test_works_on_float64():
    x = torch.randn(2, 40, 3, 3, dtype=torch.float64)
    out = bfp_quantize(x, ActFormat(bits=8, block=32))
    assert out.dtype == torch.float64
    assert torch.equal(out, ref_bfp(x, 8, 32))


# --------------------------------------------------------------------------- hostile values and arguments
SMALLEST_SUBNORMAL = 2.0**-149


@pytest.mark.parametrize("bits", [5, 8])
@pytest.mark.parametrize("peak", [SMALLEST_SUBNORMAL, 3 * SMALLEST_SUBNORMAL])
def test_denormal_blocks_keep_their_values_without_nan(bits, peak):
    """s = 2^(e - (m - 2)) underflowed to 0 in float32 and 0 / 0 gave NaN; a step raised to 2^-149
    (a divisor of every float32) keeps each value the spec keeps, exactly."""
    x = torch.zeros(1, 4, 1, 2)
    x[0, 0, 0, 0], x[0, 2, 0, 0], x[0, 1, 0, 1] = peak, -peak / 2, -peak
    out = bfp_quantize(x, ActFormat(bits=bits, block=4))
    assert torch.isfinite(out).all()
    assert torch.equal(out, ref_bfp(x, bits, 4))
    mant, step = bfp_encode(x, ActFormat(bits=bits, block=4))
    assert torch.all(step >= SMALLEST_SUBNORMAL)
    assert torch.equal(unblocked(mant.float() * step, 1, 4), out)


def test_a_huge_block_is_one_block_of_the_channels():
    """bfp_encode padded every block to its full size: a block of 10**9 tried to allocate gigabytes."""
    x = torch.randn(2, 5, 3, 3)
    mant, step = bfp_encode(x, ActFormat(bits=8, block=10**9))
    assert mant.shape == (2, 1, 5, 3, 3) and step.shape == (2, 1, 1, 3, 3)
    assert torch.equal(bfp_quantize(x, ActFormat(bits=8, block=10**9)), bfp_quantize(x, ActFormat(bits=8, block=5)))


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool])
def test_bfp_refuses_non_float_activations(dtype, one_line_dsq_error):
    x = torch.ones(1, 4, 2, 2, dtype=dtype)
    one_line_dsq_error(bfp_quantize, x, ActFormat())
    one_line_dsq_error(bfp_encode, x, ActFormat())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_floor_log2_is_exact_at_every_power_of_two(dtype):
    """floor_log2 (log2, corrected against exact powers of two; no frexp, so exporters know it)
    equals frexp's exponent minus one at every power of two of the dtype, subnormals included,
    and at both neighbours of each."""
    finfo = torch.finfo(dtype)
    smallest = int(math.log2(finfo.smallest_normal * finfo.eps))
    largest = int(math.log2(finfo.max))
    powers = torch.ldexp(torch.ones((), dtype=torch.float64), torch.arange(smallest, largest + 1)).to(dtype)
    below = torch.nextafter(powers, torch.zeros((), dtype=dtype))
    above = torch.nextafter(powers, torch.full((), float("inf"), dtype=dtype))
    peaks = torch.cat([powers, below, above, torch.rand(10_000, dtype=torch.float64).to(dtype) * 1e3])
    peaks = peaks[torch.isfinite(peaks) & (peaks > 0)]
    _, exponent = torch.frexp(peaks)
    assert torch.equal(floor_log2(peaks), (exponent - 1).to(dtype))


def test_bfp_traces_without_frexp():
    """The rounding exports: torch.export's graph holds no frexp (which torch.onnx cannot translate)."""

    class Rounding(torch.nn.Module):
        def forward(self, x):
            return bfp_quantize(x, ActFormat(8, 16), 1)

    program = torch.export.export(Rounding(), (torch.randn(2, 24, 3, 3),))
    assert not any("frexp" in str(node.target) for node in program.graph.nodes)
