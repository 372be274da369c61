"""Bit packing of b-bit VQK codes: exact round trips, byte counts, bit order, weight order."""

from __future__ import annotations

import math

import pytest
import torch

from dsq.formats import (
    BlockLayout,
    WeightFormat,
    pack,
    pack_weight,
    packed_size,
    quantize_weight,
    unpack,
    unpack_weight,
)

ALL_BITS = range(2, 9)
LENGTHS = [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 63, 1001]


def _range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _random_codes(n: int, bits: int, seed: int = 0) -> torch.Tensor:
    lo, hi = _range(bits)
    return torch.randint(lo, hi + 1, (n,), dtype=torch.int8, generator=torch.Generator().manual_seed(seed))


def _reference_pack(codes: list[int], bits: int) -> list[int]:
    """The documented order, bit by bit: code i's bit j is stream bit i*b + j, LSB first."""
    stream = [(c >> j) & 1 for c in codes for j in range(bits)]  # Python ints: two's complement bits
    stream += [0] * (-len(stream) % 8)
    return [sum(bit << k for k, bit in enumerate(stream[i : i + 8])) for i in range(0, len(stream), 8)]


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("n", LENGTHS)
def test_round_trip_and_byte_count(bits, n):
    codes = _random_codes(n, bits, seed=bits * 1000 + n)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(n * bits / 8) == packed_size(n, bits)
    out = unpack(packed, bits, n)
    assert out.dtype == torch.int8 and torch.equal(out, codes)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_extreme_codes_round_trip(bits):
    lo, hi = _range(bits)
    for codes in ([lo] * 13, [hi] * 13, [lo, hi] * 7, [-1] * 9, [0, -1, lo, hi, 1]):
        t = torch.tensor(codes, dtype=torch.int8)
        assert torch.equal(unpack(pack(t, bits), bits, len(codes)), t), codes


@pytest.mark.parametrize("bits", ALL_BITS)
def test_bit_order_matches_the_documented_stream(bits):
    codes = _random_codes(37, bits, seed=bits)
    assert pack(codes, bits).tolist() == _reference_pack(codes.tolist(), bits)


def test_known_bytes():
    assert pack(torch.tensor([1, -1, 0, -2]), 2).tolist() == [0b10_00_11_01]
    assert pack(torch.tensor([1, -8]), 4).tolist() == [0x81]
    assert pack(torch.tensor([-1, -1, -1]), 3).tolist() == [0xFF, 0x01]  # unused high bits are 0
    assert pack(torch.tensor([-128, 127]), 8).tolist() == [0x80, 0x7F]


def test_any_shape_packs_as_its_flattened_codes():
    codes = _random_codes(60, 5).reshape(3, 4, 5)
    assert torch.equal(pack(codes, 5), pack(codes.reshape(-1), 5))
    assert torch.equal(pack(codes.float(), 5), pack(codes, 5))  # the integer-valued float VQK of a fit too


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_codes_out_of_range_are_refused(bits, one_line_dsq_error):
    lo, hi = _range(bits)
    for bad in (lo - 1, hi + 1):
        message = one_line_dsq_error(pack, torch.tensor([0, bad], dtype=torch.int16), bits)
        assert f"{bits}-bit" in message


def test_unpack_refuses_a_wrong_byte_count_or_dtype(one_line_dsq_error):
    packed = pack(_random_codes(10, 3), 3)  # 30 bits: 4 bytes
    one_line_dsq_error(unpack, packed[:3], 3, 10)
    one_line_dsq_error(unpack, torch.cat([packed, packed[:1]]), 3, 10)
    one_line_dsq_error(unpack, packed.to(torch.int16), 3, 10)


@pytest.mark.parametrize("bits", [1, 9])
def test_bits_outside_2_to_8_are_refused(bits, one_line_dsq_error):
    one_line_dsq_error(pack, torch.zeros(4, dtype=torch.int8), bits)
    one_line_dsq_error(unpack, torch.zeros(1, dtype=torch.uint8), bits, 1)


# ---- whole conv weights: slice order, padding left out -------------------------------------------


@pytest.mark.parametrize(
    "shape, groups, layout",
    [
        ((8, 3, 3, 3), 1, "channel"),  # ragged: 3 input channels in blocks of 4
        ((6, 10, 1, 1), 1, "channel"),  # ragged: 10 = 4 + 4 + 2
        ((8, 1, 3, 3), 8, "auto"),  # depthwise: flat blocks of 9 taps -> 4 + 4 + 1
        ((5, 7), 1, "flat"),  # a linear weight as a 1x1 conv
    ],
)
@pytest.mark.parametrize("bits", [3, 4, 7])
def test_weight_round_trip_is_exact_and_laid_out_like_the_fit(shape, groups, layout, bits):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    qw = quantize_weight(w, WeightFormat(bits=bits, block=4, layout=layout), groups)
    packed = pack_weight(qw.vqk, qw.layout, bits)
    assert packed.numel() == packed_size(w.numel(), bits)  # no byte for the block padding
    vqk = unpack_weight(packed, qw.layout, bits).reshape(shape)
    assert torch.equal(vqk, qw.vqk)
    assert vqk.stride() == qw.vqk.stride()  # convolutions may pick another kernel for another layout


def test_weight_codes_go_in_slice_order():
    layout = BlockLayout("channel", 2, (1, 3, 1, 2))  # slices (tap 0: c0 c1), (tap 1: c0 c1), (tap 0: c2), (tap 1: c2)
    vqk = torch.tensor([[[[1, 2]], [[3, -4]], [[-1, 0]]]], dtype=torch.int8)  # (O=1, I=3, kh=1, kw=2)
    codes = unpack(pack_weight(vqk, layout, 4), 4, 6).tolist()
    assert codes == [1, 3, 2, -4, -1, 0]


# ---- hostile codes and counts -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "codes",
    [
        torch.tensor([65537, 1], dtype=torch.int32),  # wrapped to 1 in int16 on main and packed
        torch.tensor([65536.0, 1.0]),  # likewise, as floats
        torch.tensor([1e10, 0.0]),
        torch.tensor([2.5, 1.0]),  # main truncated to 2
        torch.tensor([float("nan"), 1.0]),
        torch.tensor([float("inf"), 1.0]),
        torch.tensor([True, False]),
    ],
)
def test_pack_refuses_codes_that_are_not_whole_b_bit_numbers(codes, one_line_dsq_error):
    one_line_dsq_error(pack, codes, 4)


@pytest.mark.parametrize("count", [2.0, True, None])  # main: a TypeError from deep inside, or True as 1
def test_unpack_refuses_a_count_that_is_not_a_whole_number(count, one_line_dsq_error):
    one_line_dsq_error(unpack, torch.zeros(1, dtype=torch.uint8), 4, count)


def test_unpack_weight_checks_the_bytes_before_allocating_the_layout(one_line_dsq_error):
    """A file claiming a 10**6 x 10**6 weight with 4 bytes: main built the layout's 10**12-entry mask first."""
    layout = BlockLayout("channel", 32, (10**6, 10**6, 1, 1))
    one_line_dsq_error(unpack_weight, torch.zeros(4, dtype=torch.uint8), layout, 4)
