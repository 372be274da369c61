"""Data-aware VQK/KDS (dsq.calibration.scales): the output error on the inputs, not the weight error."""

from __future__ import annotations

import pytest
import torch

from dsq.calibration.scales import fit_to_inputs, output_error_scales, slice_columns
from dsq.formats import BlockLayout, WeightFormat, dequantize, quantize_weight


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    d = (w - w_hat).reshape(h.shape[0], -1, h.shape[1]).double()
    return torch.einsum("grd,gde,gre->", d, h, d).item()


def correlated_inputs(groups: int, dim: int, n: int = 4000, seed: int = 0) -> torch.Tensor:
    """(G, D, D) second moments of inputs with strongly correlated components and a common mean."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(groups, dim, dim, generator=g) / dim**0.5 + torch.eye(dim)
    x = mix @ torch.randn(groups, dim, n, generator=g) + 0.5
    return (x @ x.transpose(1, 2)).double() / n


@pytest.mark.parametrize(
    "kind,shape,block",
    [
        ("channel", (8, 40, 3, 3), 16),  # ragged channel blocks
        ("flat", (8, 5, 3, 3), 16),  # blocks over in-channels x taps
        ("channel", (6, 20, 1, 1), 8),
    ],
)
def test_slice_columns_cover_every_column_once_in_kds_order(kind, shape, block):
    layout = BlockLayout(kind, block, shape)
    columns, lengths = slice_columns(layout)
    _, i, kh, kw = shape
    assert sorted(columns.tolist()) == list(range(i * kh * kw))
    assert len(lengths) * shape[0] == layout.n_slices and int(lengths.sum()) == i * kh * kw
    w = torch.randn(shape)  # slice s of row 0 holds exactly the columns listed for it
    rows = layout.to_slices(w)[: len(lengths)]
    flat = w[0].reshape(-1)
    start = 0
    for s, n in enumerate(lengths.tolist()):
        assert torch.equal(
            rows[s][rows[s] != 0], flat[columns[start : start + n]][flat[columns[start : start + n]] != 0]
        )
        start += n


@pytest.mark.parametrize(
    "groups,shape,kind", [(1, (16, 24, 3, 3), "channel"), (4, (16, 6, 3, 3), "flat"), (1, (12, 40, 1, 1), "channel")]
)
@pytest.mark.parametrize("bits", [2, 4])
def test_data_aware_fit_lowers_the_output_error(groups, shape, kind, bits):
    torch.manual_seed(1)
    w = torch.randn(shape) * 0.1
    layout = BlockLayout(kind, 8, shape)
    h = correlated_inputs(groups, shape[1] * shape[2] * shape[3])
    free = quantize_weight(w, WeightFormat(bits, 8, layout=kind), groups).dequantize()
    vqk, kds = fit_to_inputs(w, h, layout, bits, rounds=5, sum_weight=0.0)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert vqk.dtype == torch.int8 and vqk.shape == w.shape and int(vqk.min()) >= lo and int(vqk.max()) <= hi
    assert kds.shape == layout.scale_shape
    aware = dequantize(vqk, kds, layout)
    assert output_error(w, aware, h) < 0.8 * output_error(w, free, h)


def test_scales_solve_the_normal_equations():
    """At the least-squares scales, the output error's gradient in every scale is zero."""
    torch.manual_seed(2)
    layout = BlockLayout("channel", 4, (3, 8, 1, 1))
    w = torch.randn(1, 3, 8, dtype=torch.float64)
    codes = torch.randint(-2, 2, (1, 3, 8)).double()
    h = correlated_inputs(1, 8)
    best = output_error_scales(w, codes, h, [4, 4])

    def gradient(alpha):
        alpha = alpha.clone().requires_grad_()
        d = w - codes * alpha.repeat_interleave(4, dim=2)
        torch.einsum("grd,gde,gre->", d, h, d).backward()
        return alpha.grad.abs().max()

    assert gradient(best) < 1e-3 * gradient(best * 1.1)
    assert layout.n_slices == best.numel()


def test_dead_inputs_and_zero_weights_give_finite_results():
    w = torch.zeros(4, 8, 3, 3)
    w[0, 0, 1, 1] = 0.3
    h = correlated_inputs(1, 72)
    h[:, :9] = 0  # input channel 0 never fires
    h[:, :, :9] = 0
    vqk, kds = fit_to_inputs(w, h, BlockLayout("channel", 8, tuple(w.shape)), 4, 5, 0.0)
    assert torch.isfinite(kds).all()
    assert torch.equal(dequantize(vqk, kds, BlockLayout("channel", 8, tuple(w.shape)))[1:], torch.zeros(3, 8, 3, 3))
