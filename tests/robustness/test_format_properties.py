"""Property-based tests of the format math (dsq.formats) over hostile shapes, settings and values.

Shapes: 1x1 to 3x3 kernels, 1 to 40 input channels, blocks 1 to 256 (and 10**9), so blocks
shorter and longer than the axis and ragged last blocks; both layouts and the auto rule.
Values: all-zero slices, a single non-zero in a block, mixed signs, magnitudes from denormal
(1e-45) to near the float32 max (3e38), plus any float32 that hypothesis picks (it favours
edge values: subnormals, the max, -0.0). Derandomized: CI runs the same examples every time.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsq.errors import DsqError
from dsq.formats import (
    CHANNEL,
    FLAT,
    LAYOUTS,
    ActFormat,
    BlockLayout,
    WeightFormat,
    bfp_encode,
    bfp_quantize,
    fit_kl,
    fit_l2,
    pack,
    pack_weight,
    packed_size,
    quantize_weight,
    unpack,
    unpack_weight,
)
from dsq.formats.weights import code_range

from zoo import ref_bfp

PROPERTY = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
F32 = torch.finfo(torch.float32)
SMALLEST_SUBNORMAL = F32.smallest_normal * F32.eps  # 2^-149
MAGNITUDES = [1.0, 1e-3, 1e-16, 2.0**-60, 1e-30, 1e-40, 1e-45, 1e30, 3e38, F32.max]
ANY_FLOAT32 = st.floats(width=32, allow_nan=False, allow_infinity=False)

bits_st = st.integers(2, 8)
blocks_st = st.one_of(st.integers(1, 256), st.sampled_from([1, 2, 3, 8, 9, 32, 10**9]))


@st.composite
def tensors(draw, shape, magnitudes=MAGNITUDES, specials=True):
    """float32 `shape`: uniform in [-scale, scale], some entries zeroed, some set to any float32."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from(magnitudes))
    x = ((torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * scale).float()
    zero_share = draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]))
    x[torch.rand(shape, generator=g) < zero_share] = 0
    flat = x.view(-1)
    if specials and flat.numel():
        for index, value in draw(st.lists(st.tuples(st.integers(0, flat.numel() - 1), ANY_FLOAT32), max_size=6)):
            flat[index] = value
    return x


@st.composite
def conv_weights(draw):
    """A conv weight (O, I, kh, kw) or a linear one (O, I)."""
    o, i = draw(st.integers(1, 4)), draw(st.integers(1, 40))
    kh, kw = draw(st.sampled_from([(1, 1), (3, 3), (1, 3), (2, 1)]))
    shape = (o, i) if draw(st.booleans()) and kh == kw == 1 else (o, i, kh, kw)
    return draw(tensors(shape))


weight_formats = st.builds(
    WeightFormat,
    bits=bits_st,
    block=blocks_st,
    method=st.sampled_from(["l2", "kl"]),
    rounds=st.integers(0, 6),
    layout=st.sampled_from(LAYOUTS),
    sum_weight=st.sampled_from([0.0, 0.466, 3.0]),
)


def slice_error(w: torch.Tensor, q: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """||w - alpha q||^2 per slice, in float64."""
    return ((w.double() - alpha.double()[:, None] * q.double()) ** 2).sum(dim=1)


def least_squares_scale(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """<w, q> / <q, q> per slice in float64 (0 where q is all zero)."""
    wd, qd = w.double(), q.double()
    qq = (qd * qd).sum(dim=1)
    return torch.where(qq > 0, (wd * qd).sum(dim=1) / qq.clamp_min(1), torch.zeros_like(qq))


# --------------------------------------------------------------------------- quantize_weight
@PROPERTY
@given(w=conv_weights(), fmt=weight_formats, groups=st.sampled_from([1, 2, 3]))
def test_quantize_weight_is_finite_in_range_and_keeps_zero_slices(w, fmt, groups):
    before = w.clone()
    qw = quantize_weight(w, fmt, groups)
    assert torch.equal(w, before)  # the input is never modified
    in_per_group = w.shape[1]
    expected_kind = (
        fmt.layout if fmt.layout != "auto" else (FLAT if groups > 1 and in_per_group < fmt.block else CHANNEL)
    )
    assert qw.layout.kind == expected_kind
    lo, hi = code_range(fmt.bits)
    assert qw.vqk.dtype == torch.int8 and qw.vqk.shape == w.shape
    assert int(qw.vqk.min()) >= lo and int(qw.vqk.max()) <= hi
    assert qw.kds.dtype == torch.float32 and tuple(qw.kds.shape) == qw.layout.scale_shape
    assert torch.isfinite(qw.kds).all()
    deq = qw.dequantize()
    assert deq.shape == w.shape and torch.isfinite(deq).all()
    rows = qw.layout.to_slices(w.reshape(qw.layout.shape))
    zero = (rows == 0).all(dim=1)
    assert torch.all(qw.kds.flatten()[zero] == 0)
    assert torch.all(qw.layout.to_slices(qw.vqk.reshape(qw.layout.shape))[zero] == 0)


@PROPERTY
@given(
    w=conv_weights(),
    extra=st.sampled_from([0, 1, 7, 10**9]),
    bits=bits_st,
    kind=st.sampled_from([CHANNEL, FLAT]),
    method=st.sampled_from(["l2", "kl"]),
)
def test_a_block_longer_than_the_axis_is_the_axis(w, extra, bits, kind, method):
    """Any block at least as long as the blocked axis gives what a block of the axis length gives,
    and costs no memory in proportion to the block (10**9 here)."""
    shape = tuple(w.shape) + (1, 1) * (w.dim() == 2)
    axis = BlockLayout(kind, 1, shape).axis_length
    qw = quantize_weight(w, WeightFormat(bits=bits, block=axis + extra, layout=kind, method=method))
    exact = quantize_weight(w, WeightFormat(bits=bits, block=axis, layout=kind, method=method))
    assert qw.layout.width == axis
    assert torch.equal(qw.vqk, exact.vqk) and torch.equal(qw.kds, exact.kds)


# --------------------------------------------------------------------------- L2 and KL fits on slices
@st.composite
def slices(draw, magnitudes=MAGNITUDES, specials=True):
    n, width = draw(st.integers(1, 8)), draw(st.integers(1, 64))
    return draw(tensors((n, width), magnitudes, specials))


@PROPERTY
@given(
    w=slices(),
    bits=bits_st,
    rounds=st.integers(0, 8),
    sum_weight=st.sampled_from([0.0, 0.466, 3.0]),
    method=st.sampled_from(["l2", "kl"]),
)
def test_fits_give_whole_codes_in_range_and_finite_scales(w, bits, rounds, sum_weight, method):
    q, alpha = fit_l2(w, bits, rounds, sum_weight) if method == "l2" else fit_kl(w, bits)
    lo, hi = code_range(bits)
    assert torch.equal(q, q.round()) and q.min() >= lo and q.max() <= hi
    assert torch.isfinite(alpha).all()
    assert torch.isfinite(alpha[:, None] * q).all()  # the dequantized slices, in float32
    zero = (w == 0).all(dim=1)
    assert torch.all(q[zero] == 0) and torch.all(alpha[zero] == 0)
    if method == "kl":  # the codes fall as the weights rise (or rise as they fall): both fits see that
        _, alpha_l2 = fit_l2(w, bits)
        varied = q.amax(dim=1) > q.amin(dim=1)
        assert torch.all(torch.sign(alpha[varied]) == torch.sign(alpha_l2[varied]))


@PROPERTY
@given(w=slices(), bits=bits_st, rounds=st.integers(0, 8))
def test_l2_scale_is_the_least_squares_scale_of_its_codes(w, bits, rounds):
    q, alpha = fit_l2(w, bits, rounds, 0.0)
    best = least_squares_scale(w, q)
    representable = best.abs() * q.double().abs().amax(dim=1) <= F32.max
    close = (alpha.double() - best).abs() <= 1e-6 * best.abs() + SMALLEST_SUBNORMAL
    assert torch.all(close | ~representable)
    # where alpha * q would overflow float32, alpha is the largest scale that does not (same sign)
    assert torch.all((alpha.double() * best >= 0) | (best == 0))
    assert torch.all(slice_error(w, q, alpha) <= (w.double() ** 2).sum(dim=1) * (1 + 1e-6))  # never worse than 0


@PROPERTY
@given(w=slices(), bits=bits_st, sum_weight=st.sampled_from([0.0, 0.466, 3.0]), rounds=st.integers(1, 8))
def test_refinement_never_increases_the_slice_error(w, bits, sum_weight, rounds):
    errors = [slice_error(w, *fit_l2(w, bits, r, sum_weight)) for r in (0, rounds, rounds + 3)]
    slack = 1e-6 * (w.double() ** 2).sum(dim=1)  # float32 rounding of alpha
    assert torch.all(errors[1] <= errors[0] + slack)
    assert torch.all(errors[2] <= errors[1] + slack)


@PROPERTY
@given(
    w=slices(magnitudes=[1.0], specials=False),
    bits=bits_st,
    rounds=st.integers(0, 6),
    sum_weight=st.sampled_from([0.0, 0.466]),
    power=st.integers(-100, 100),
)
def test_l2_fit_is_exactly_scale_equivariant(w, bits, rounds, sum_weight, power):
    """Scaling a slice by 2^k scales alpha by 2^k and keeps the codes: near the float32 max too."""
    w = torch.where(w.abs() < 2.0**-20, torch.zeros_like(w), w)  # keep scaled values normal floats
    q, alpha = fit_l2(w, bits, rounds, sum_weight)
    q_scaled, alpha_scaled = fit_l2(w * 2.0**power, bits, rounds, sum_weight)
    assert torch.equal(q_scaled, q)
    assert torch.equal(alpha_scaled, alpha * 2.0**power)


@PROPERTY
@given(w=slices(magnitudes=[1.0], specials=False), bits=bits_st, power=st.integers(30, 100))
def test_kl_scale_of_tiny_weights_is_the_centred_least_squares_scale(w, bits, power):
    """For tiny weights KL(softmax(w) || softmax(alpha q)) ~ ||(w - mean w) - alpha (q - mean q)||^2 / 2n:
    the KL scale tends to the least-squares scale of the centred slices, however tiny the weights."""
    w = w * 2.0**-power
    q, alpha = fit_kl(w, bits)
    qc = q.double() - q.double().mean(dim=1, keepdim=True)
    wc = w.double() - w.double().mean(dim=1, keepdim=True)
    qq = (qc * qc).sum(dim=1)
    varied = qq > 0
    expected = (wc * qc).sum(dim=1)[varied] / qq[varied]
    assert torch.allclose(alpha.double()[varied], expected, rtol=1e-4, atol=0)


# --------------------------------------------------------------------------- packing
@PROPERTY
@given(
    bits=bits_st,
    n=st.integers(0, 200),
    seed=st.integers(0, 2**31),
    as_float=st.booleans(),
    intruder=st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1), ANY_FLOAT32, st.just(float("nan"))),
)
def test_pack_round_trips_every_b_bit_code_and_refuses_anything_else(bits, n, seed, as_float, intruder):
    """Whole numbers in [-2^(b-1), 2^(b-1) - 1] (as integers or floats) pack and unpack exactly;
    one code outside them (too large for b bits or int16, a fraction, NaN) is a one-line error."""
    lo, hi = code_range(bits)
    codes = torch.randint(lo, hi + 1, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    codes[: min(n, 2)] = torch.tensor([lo, hi][: min(n, 2)], dtype=torch.int8)  # the extremes
    values = codes.to(torch.float64 if as_float or isinstance(intruder, float) else torch.int64)
    if intruder is not None:
        values = torch.cat([values, torch.tensor([intruder], dtype=values.dtype)])
        if intruder != intruder or intruder != round(intruder) or not lo <= intruder <= hi:
            with pytest.raises(DsqError):
                pack(values, bits)
            return
        codes = torch.cat([codes, torch.tensor([intruder], dtype=torch.int8)])
    packed = pack(values, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_size(len(codes), bits) == math.ceil(len(codes) * bits / 8)
    assert torch.equal(unpack(packed, bits, len(codes)), codes)


@PROPERTY
@given(
    o=st.integers(1, 4),
    i=st.integers(1, 40),
    taps=st.sampled_from([(1, 1), (3, 3), (1, 3)]),
    kind=st.sampled_from([CHANNEL, FLAT]),
    block=blocks_st,
    bits=bits_st,
    seed=st.integers(0, 2**31),
)
def test_pack_weight_round_trips_every_layout(o, i, taps, kind, block, bits, seed):
    layout = BlockLayout(kind, block, (o, i, *taps))
    lo, hi = code_range(bits)
    vqk = torch.randint(lo, hi + 1, layout.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    packed = pack_weight(vqk, layout, bits)
    assert packed.numel() == packed_size(vqk.numel(), bits)  # no byte for block padding
    assert torch.equal(unpack_weight(packed, layout, bits), vqk)


# --------------------------------------------------------------------------- block floating point
@st.composite
def activations(draw):
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 40)), draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    return draw(tensors(shape))


@PROPERTY
@given(x=activations(), bits=bits_st, block=blocks_st, channels_last=st.booleans())
def test_bfp_is_the_spec_formula_exactly(x, bits, block, channels_last):
    """out = clamp(round(x / s)) * s with s = 2^(floor(log2 max|x|) - (m - 2)) per block, evaluated
    in float64: finite, zeros stay zero, signs kept, idempotent, for denormal and near-max blocks too."""
    fmt, dim = ActFormat(bits=bits, block=block), (-1 if channels_last else 1)
    if channels_last:
        x = x.permute(0, 2, 3, 1).contiguous()
    before = x.clone()
    out = bfp_quantize(x, fmt, dim)
    assert torch.equal(x, before)
    assert torch.isfinite(out).all()
    assert torch.equal(out, ref_bfp(x, bits, block, dim))
    assert torch.all(out[x == 0] == 0) and torch.all(out * x >= 0)
    assert torch.equal(bfp_quantize(out, fmt, dim), out)


@PROPERTY
@given(x=activations(), bits=bits_st, block=blocks_st)
def test_bfp_mantissas_and_steps(x, bits, block):
    """|mant| <= 2^(m-1) - 1, mant * step = bfp_quantize; the step is 2^(e - (m - 2)) and the block max
    uses the top mantissa bit, except where that step is below float32's smallest subnormal: there
    the step is 2^-149 (every float32 is a multiple of it, so the values stay exact)."""
    fmt = ActFormat(bits=bits, block=block)
    mant, step = bfp_encode(x, fmt)
    lim = 2 ** (bits - 1) - 1
    assert mant.dtype == torch.int8 and int(mant.abs().max()) <= lim
    c = x.shape[1]
    assert torch.equal((mant.float() * step).flatten(1, 2)[:, :c], bfp_quantize(x, fmt))
    peak = (
        mant.new_zeros(()).double() + x.double().abs().unflatten(1, (-1, mant.shape[2])).amax(dim=2, keepdim=True)
        if c % mant.shape[2] == 0
        else None
    )
    xb = torch.nn.functional.pad(x.double(), (0, 0, 0, 0, 0, mant.shape[1] * mant.shape[2] - c))
    peak = xb.abs().unflatten(1, (mant.shape[1], mant.shape[2])).amax(dim=2, keepdim=True)
    e = torch.frexp(peak)[1] - 1
    spec_step = torch.where(peak > 0, torch.exp2((e - (bits - 2)).double()), step.double())
    assert torch.equal(step.double(), spec_step.clamp_min(SMALLEST_SUBNORMAL))
    top = (spec_step >= SMALLEST_SUBNORMAL) & (peak > 0)
    peak_mant = mant.abs().amax(dim=2, keepdim=True)
    assert torch.all(peak_mant[top] >= 2 ** (bits - 2))


@PROPERTY
@given(
    power=st.one_of(st.integers(-149, -140), st.integers(-149, 127)),
    negative=st.booleans(),
    bits=bits_st,
    block=blocks_st,
    x=activations(),
)
def test_bfp_keeps_a_power_of_two_block_max_exactly(power, negative, bits, block, x):
    x = x.clamp(-(2.0**power), 2.0**power)  # the power of two below is the block max
    x[0, 0, 0, 0] = -(2.0**power) if negative else 2.0**power
    assert bfp_quantize(x, ActFormat(bits=bits, block=block))[0, 0, 0, 0] == x[0, 0, 0, 0]
