"""Block layouts: slices, KDS shapes and scale expansion against a naive per-slice loop."""

from __future__ import annotations

import pytest
import torch

from dsq.formats import AUTO, CHANNEL, FLAT, BlockLayout, blocked, unblocked
from dsq.formats.blocks import n_blocks, resolve_layout

from zoo import ref_expand, ref_layout, ref_scale_shape, ref_slices

# (O, I, kh, kw, block): ragged last blocks, block 1, block > I, depthwise-like I = 1, 1x1, 7x7 stem
SHAPES = [
    (3, 40, 3, 3, 32),
    (2, 64, 1, 1, 32),
    (2, 5, 3, 3, 1),
    (2, 5, 3, 3, 8),
    (3, 1, 3, 3, 4),
    (2, 3, 7, 7, 32),
    (4, 33, 1, 3, 16),
]


def _weight(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", [CHANNEL, FLAT])
@pytest.mark.parametrize("o,i,kh,kw,block", SHAPES)
def test_to_slices_matches_naive_loop(kind, o, i, kh, kw, block):
    w = _weight((o, i, kh, kw))
    layout = BlockLayout(kind, block, (o, i, kh, kw))
    ref = ref_slices(w, kind, block)

    assert layout.scale_shape == ref_scale_shape((o, i, kh, kw), kind, block)
    assert layout.n_slices == len(ref)
    rows = layout.to_slices(w)
    mask = layout.valid_mask()
    width = min(block, i if kind == CHANNEL else i * kh * kw)  # a block longer than the axis is the axis
    assert layout.width == width
    assert rows.shape == (len(ref), width) and mask.shape == (len(ref), width) and mask.dtype == torch.bool
    for r, (_, s) in enumerate(ref):
        n = s.numel()
        assert torch.equal(rows[r, :n], s), f"slice {r}"
        assert torch.all(rows[r, n:] == 0), "padding must be zero"
        assert mask[r, :n].all() and not mask[r, n:].any()
    # every real weight appears exactly once
    assert int(mask.sum()) == w.numel()


@pytest.mark.parametrize("kind", [CHANNEL, FLAT])
@pytest.mark.parametrize("o,i,kh,kw,block", SHAPES)
def test_from_slices_inverts_to_slices(kind, o, i, kh, kw, block):
    w = _weight((o, i, kh, kw), seed=1)
    layout = BlockLayout(kind, block, (o, i, kh, kw))
    assert torch.equal(layout.from_slices(layout.to_slices(w)), w)
    # and from naive rows: put slice r's values at its place, expect the weight back
    ref = ref_slices(w, kind, block)
    rows = torch.zeros(len(ref), layout.width)
    for r, (_, s) in enumerate(ref):
        rows[r, : s.numel()] = s
    assert torch.equal(layout.from_slices(rows), w)


@pytest.mark.parametrize("kind", [CHANNEL, FLAT])
@pytest.mark.parametrize("o,i,kh,kw,block", SHAPES)
def test_expand_scales_matches_naive_indexing(kind, o, i, kh, kw, block):
    shape = (o, i, kh, kw)
    layout = BlockLayout(kind, block, shape)
    kds = torch.randn(layout.scale_shape, generator=torch.Generator().manual_seed(2))
    got = layout.expand_scales(kds).reshape(shape)
    assert torch.equal(got, ref_expand(kds, shape, kind, block))


@pytest.mark.parametrize("kind", [CHANNEL, FLAT])
def test_expand_scales_puts_each_slice_scale_on_its_own_weights(kind):
    shape, block = (3, 40, 3, 3), 32
    layout = BlockLayout(kind, block, shape)
    ids = torch.arange(layout.n_slices, dtype=torch.float32).reshape(layout.scale_shape)
    per_weight = layout.expand_scales(ids).reshape(shape)
    # the slice id of each weight, via to_slices of the expanded map, must be constant per row
    rows = layout.to_slices(per_weight)
    mask = layout.valid_mask()
    for r in range(layout.n_slices):
        assert torch.all(rows[r][mask[r]] == r)


def test_channel_and_flat_agree_for_1x1():
    """For a 1x1 kernel both layouts cut the same input-channel axis the same way."""
    w = _weight((4, 70, 1, 1), seed=3)
    a = BlockLayout(CHANNEL, 32, tuple(w.shape))
    b = BlockLayout(FLAT, 32, tuple(w.shape))
    assert torch.equal(a.to_slices(w), b.to_slices(w))
    assert a.n_slices == b.n_slices == 4 * 3


@pytest.mark.parametrize("groups", [1, 2, 64])
@pytest.mark.parametrize("in_per_group,block", [(1, 32), (31, 32), (32, 32), (33, 32), (1, 1), (3, 4), (64, 8)])
def test_resolve_layout_auto_is_flat_iff_grouped_and_narrower_than_block(in_per_group, block, groups):
    expected = FLAT if groups > 1 and in_per_group < block else CHANNEL
    assert expected == ref_layout(in_per_group, block, groups)
    assert resolve_layout(AUTO, in_per_group, block, groups) == expected
    assert resolve_layout(CHANNEL, in_per_group, block, groups) == CHANNEL
    assert resolve_layout(FLAT, in_per_group, block, groups) == FLAT


def test_resolve_layout_rejects_unknown(one_line_dsq_error):
    msg = one_line_dsq_error(resolve_layout, "rows", 8, 32)
    assert "rows" in msg


@pytest.mark.parametrize(
    "length,block,expected", [(40, 32, 2), (32, 32, 1), (1, 32, 1), (5, 1, 5), (0, 4, 0), (65, 8, 9)]
)
def test_n_blocks(length, block, expected):
    assert n_blocks(length, block) == expected


@pytest.mark.parametrize("dim", [0, 1, 2, -1])
@pytest.mark.parametrize("block", [1, 3, 4, 16])
def test_blocked_unblocked_round_trip(dim, block):
    x = torch.randn(5, 6, 7)
    length = x.shape[dim]
    b = blocked(x, dim, block)
    d = dim % x.dim()
    nb, width = -(-length // block), min(block, length)  # a block longer than the axis is the axis
    assert b.shape[d] == nb and b.shape[d + 1] == width
    # padding holds zeros, real values sit at index j * block + k
    flat = b.movedim((d, d + 1), (-2, -1)).reshape(*[s for k, s in enumerate(x.shape) if k != d], nb * width)
    assert torch.all(flat[..., length:] == 0)
    assert torch.equal(flat[..., :length], x.movedim(d, -1))
    assert torch.equal(unblocked(b, d, length), x)


# --------------------------------------------------------------------------- hostile arguments
@pytest.mark.parametrize("kind", [CHANNEL, FLAT])
def test_a_huge_block_costs_no_memory_and_equals_the_axis(kind):
    """A block of 10**9 used to pad every slice to 10**9 numbers (gigabytes for a small weight)."""
    w = _weight((2, 5, 3, 3), seed=4)
    huge = BlockLayout(kind, 10**9, tuple(w.shape))
    axis = BlockLayout(kind, huge.axis_length, tuple(w.shape))
    assert huge.width == axis.width == huge.axis_length
    assert huge.scale_shape == axis.scale_shape
    assert torch.equal(huge.to_slices(w), axis.to_slices(w))
    assert torch.equal(huge.valid_mask(), axis.valid_mask())
    kds = torch.randn(huge.scale_shape)
    assert torch.equal(huge.expand_scales(kds), axis.expand_scales(kds))
    assert torch.equal(huge.from_slices(huge.to_slices(w)), w)


@pytest.mark.parametrize(
    "kind,block,shape",
    [
        ("rows", 4, (1, 4, 1, 1)),  # main cut an unknown kind as flat
        ("auto", 4, (1, 4, 1, 1)),  # auto is resolved before a layout is made
        (CHANNEL, 0, (1, 4, 1, 1)),
        (CHANNEL, 2.0, (1, 4, 1, 1)),
        (CHANNEL, 4, (1, 4, 1)),
        (CHANNEL, 4, (1, -4, 1, 1)),
        (FLAT, 4, (1, 4.0, 1, 1)),
    ],
)
def test_block_layout_refuses_what_it_cannot_cut(kind, block, shape, one_line_dsq_error):
    one_line_dsq_error(BlockLayout, kind, block, shape)


@pytest.mark.parametrize("block", [0, -1, 2.0])
def test_blocked_refuses_a_block_below_one(block, one_line_dsq_error):
    one_line_dsq_error(blocked, torch.zeros(2, 4), 1, block)
