"""VQK/KDS fitting: the spec's test vector, rounding, clamping, refinement, KL, format checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from dsq.errors import DsqError
from dsq.formats import ActFormat, WeightFormat, dequantize, fit_kl, fit_l2, quantize_weight

from zoo import ref_dequantize, ref_l2_slice, ref_layout, ref_scale_shape, ref_slices

SPEC_W = [0.3, 0.1, 0.4, -0.5, -0.3, -0.4, -0.5, -0.5, 1.0]
SPEC_Q = [-2, -1, -3, 4, 2, 3, 4, 4, -8]


def _rows(n, length, seed=0, scale=1.0, dtype=torch.float32):
    return torch.randn(n, length, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


def _sq_err(w, q, alpha):
    return ((w.double() - alpha.double()[:, None] * q.double()) ** 2).sum(dim=1)


# --------------------------------------------------------------------------- closed-form L2
def test_spec_test_vector():
    q, alpha = fit_l2(torch.tensor([SPEC_W]), bits=4, rounds=0)
    assert q.tolist() == [[float(v) for v in SPEC_Q]]
    # by hand: <w, q> = -17.7, <q, q> = 139
    assert sum(a * b for a, b in zip(SPEC_W, SPEC_Q)) == pytest.approx(-17.7)
    assert sum(b * b for b in SPEC_Q) == 139
    assert alpha.item() == pytest.approx(-17.7 / 139, rel=1e-6)
    assert alpha.item() == pytest.approx(-0.1273381, abs=1e-7)


def test_the_first_of_a_tied_peak_takes_the_most_negative_code():
    """The paper's map sends the largest magnitude to -2^(b-1); of +m and -m, the first one
    (as an argmax over magnitudes picks it), whichever sign it has."""
    from dsq.formats.weights import initial_codes

    w = torch.tensor([[0.5, -2.0, 1.0, 2.0], [2.0, 0.5, -2.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, -3.0, 3.0, -3.0]])
    q = initial_codes(w.double(), 4)
    assert q.tolist() == [[2, -8, 4, 7], [-8, -2, 7, -4], [0, 0, 0, 0], [3, -8, 7, -8]]


def test_spec_test_vector_through_quantize_weight():
    """A 1x1 conv with 9 input channels and block 9 holds exactly the spec's slice."""
    w = torch.tensor(SPEC_W).reshape(1, 9, 1, 1)
    qw = quantize_weight(w, WeightFormat(bits=4, block=9, rounds=0, layout="channel", sum_weight=0.0))
    assert qw.vqk.dtype == torch.int8
    assert qw.vqk.flatten().tolist() == SPEC_Q
    assert qw.kds.flatten().item() == pytest.approx(-17.7 / 139, rel=1e-6)


@pytest.mark.parametrize("lam", [0.0, 0.25, 1 / (math.pi - 1), 3.0])
def test_sum_aware_scale_on_spec_vector(lam):
    """alpha minimising ||w - a q||^2 + lam (sum w - a sum q)^2: setting the derivative to zero
    gives a = (<w,q> + lam sum(w) sum(q)) / (<q,q> + lam sum(q)^2); here sum w = -0.4, sum q = 3."""
    assert sum(SPEC_W) == pytest.approx(-0.4) and sum(SPEC_Q) == 3
    expected = (-17.7 + lam * -0.4 * 3) / (139 + lam * 9)
    q, alpha = fit_l2(torch.tensor([SPEC_W]), bits=4, rounds=0, sum_weight=lam)
    assert q.tolist() == [[float(v) for v in SPEC_Q]]
    assert alpha.item() == pytest.approx(expected, rel=1e-6)
    w = torch.tensor(SPEC_W).reshape(1, 9, 1, 1)
    qw = quantize_weight(w, WeightFormat(bits=4, block=9, rounds=0, layout="channel", sum_weight=lam))
    assert qw.kds.item() == pytest.approx(expected, rel=1e-6)


def test_default_sum_weight_is_documented_value():
    assert WeightFormat().sum_weight == pytest.approx(1 / (math.pi - 1), abs=1e-3)


def test_sum_aware_scale_minimises_its_objective():
    w = _rows(200, 32, seed=12).abs() * 0.1 + 0.02 * _rows(200, 32, seed=13)  # slices with non-zero mean
    lam = 0.5
    q, alpha = fit_l2(w, 4, rounds=0, sum_weight=lam)

    def objective(a):
        wd, qd, ad = w.double(), q.double(), a.double()
        return ((wd - ad[:, None] * qd) ** 2).sum(1) + lam * (wd.sum(1) - ad * qd.sum(1)) ** 2

    best = objective(alpha)
    for f in (0.995, 1.005):
        assert torch.all(best <= objective(alpha * f) + 1e-12)
    # it trades L2 error for a smaller slice-sum error than the plain fit
    q0, a0 = fit_l2(w, 4, rounds=0)
    assert torch.equal(q, q0)

    def sum_err(a):
        return (w.double().sum(1) - a.double() * q.double().sum(1)).abs().sum()

    assert sum_err(alpha) < sum_err(a0)


def test_refinement_does_not_hurt_spec_vector():
    w = torch.tensor([SPEC_W])
    q0, a0 = fit_l2(w, 4, rounds=0)
    q5, a5 = fit_l2(w, 4, rounds=5)
    assert _sq_err(w, q5, a5).item() <= _sq_err(w, q0, a0).item() + 1e-12


def test_round_half_to_even():
    # max 1 -> scale -8 (b = 4): w * -8 = [-8, 2.5, 3.5, 0.5, -1.5], all exact in binary
    w = torch.tensor([[1.0, -0.3125, -0.4375, -0.0625, 0.1875]])
    q, _ = fit_l2(w, 4, rounds=0)
    assert q.tolist() == [[-8.0, 2.0, 4.0, 0.0, -2.0]]  # half away from zero would give 3, 4, 1, -2


def test_clamp_on():
    # max magnitude -1 -> scale +8: it lands on -8; 0.99 * 8 = 7.92 rounds to 8, one past the range
    w = torch.tensor([[-1.0, 0.99, 0.5]])
    q, _ = fit_l2(w, 4, rounds=0)
    assert q.tolist() == [[-8.0, 7.0, 4.0]]


def test_largest_element_lands_on_most_negative_code():
    w = _rows(200, 32, seed=4)
    for bits in range(2, 9):
        q, _ = fit_l2(w, bits, rounds=0)
        idx = w.abs().argmax(dim=1)
        assert torch.all(q[torch.arange(len(w)), idx] == -(2 ** (bits - 1)))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("rounds", [0, 3])
def test_codes_within_range(bits, rounds):
    w = torch.cat([_rows(300, 32, seed=bits), _rows(50, 32, seed=99, scale=1e4), _rows(50, 32, seed=98, scale=1e-6)])
    q, alpha = fit_l2(w, bits, rounds=rounds)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert torch.all(q == q.round())
    assert int(q.min()) >= lo and int(q.max()) <= hi
    assert int(q.min()) == lo  # the range is used
    assert torch.isfinite(alpha).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_matches_naive_per_slice_reference(bits):
    w = _rows(64, 32, seed=10 + bits)
    w[5] = 0
    w[7, 20:] = 0  # a ragged slice, zero padded
    q, alpha = fit_l2(w, bits, rounds=0)
    for r in range(len(w)):
        q_ref, a_ref = ref_l2_slice(w[r].numpy(), bits)
        assert q[r].tolist() == q_ref.tolist(), f"slice {r}"
        assert alpha[r].item() == pytest.approx(a_ref, rel=1e-5, abs=1e-12)


def test_alpha_is_least_squares_for_final_codes():
    w = _rows(100, 32, seed=5)
    for rounds in (0, 1, 5):
        q, alpha = fit_l2(w, 3, rounds=rounds)
        wd, qd = w.double(), q.double()
        expected = (wd * qd).sum(1) / (qd * qd).sum(1)
        assert torch.allclose(alpha.double(), expected, rtol=1e-5)
        # no other scale beats it for these codes (first-order check around alpha)
        for f in (0.99, 1.01):
            assert torch.all(_sq_err(w, q, alpha) <= _sq_err(w, q, alpha * f) + 1e-9)


def test_zero_slices_give_zero_codes_and_scale():
    w = _rows(6, 16, seed=6)
    w[1] = 0
    w[4] = 0
    for rounds in (0, 5):
        q, alpha = fit_l2(w, 4, rounds=rounds)
        assert torch.all(q[[1, 4]] == 0) and torch.all(alpha[[1, 4]] == 0)
        assert torch.isfinite(q).all() and torch.isfinite(alpha).all()
    q, alpha = fit_kl(w, 4)
    assert torch.all(q[[1, 4]] == 0) and torch.all(alpha[[1, 4]] == 0)
    assert torch.isfinite(alpha).all()


@pytest.mark.parametrize("method", ["l2", "kl"])
def test_all_zero_weight(method):
    w = torch.zeros(8, 40, 3, 3)
    qw = quantize_weight(w, WeightFormat(bits=4, block=32, method=method))
    assert torch.all(qw.vqk == 0) and torch.all(qw.kds == 0)
    deq = qw.dequantize()
    assert torch.isfinite(deq).all() and torch.all(deq == 0)


@pytest.mark.parametrize("sum_weight", [0.0, 0.466])
@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_refinement_never_increases_slice_error_and_reduces_total(bits, sum_weight):
    w = torch.cat([_rows(500, 32, seed=bits), torch.zeros(100, 32)])
    w[500:, :9] = _rows(100, 9, seed=bits + 50)  # short (ragged) slices
    w[:100] = w[:100] ** 3  # heavy tails
    q0, a0 = fit_l2(w, bits, rounds=0, sum_weight=sum_weight)
    e0 = _sq_err(w, q0, a0)
    for rounds in (1, 2, 5, 10):
        q, a = fit_l2(w, bits, rounds=rounds, sum_weight=sum_weight)
        e = _sq_err(w, q, a)
        assert torch.all(e <= e0 * (1 + 1e-6) + 1e-12), f"rounds={rounds}"
        assert e.sum() < e0.sum(), f"rounds={rounds} did not reduce the total error"
        assert (e < e0 * (1 - 1e-4)).sum() >= 10, f"rounds={rounds}: too few slices improved"
    # more rounds never worse than fewer, slice by slice
    q2, a2 = fit_l2(w, bits, rounds=2, sum_weight=sum_weight)
    q5, a5 = fit_l2(w, bits, rounds=5, sum_weight=sum_weight)
    assert torch.all(_sq_err(w, q5, a5) <= _sq_err(w, q2, a2) * (1 + 1e-6) + 1e-12)


def _refine_every_slice(w, bits, rounds, sum_weight):
    """The refinement as first written: every round refits every slice and keeps what improved."""
    from dsq.formats.weights import codes_for_scale, initial_codes, slice_stats, sum_aware_scale

    wd = w.double()
    q, stats = initial_codes(wd, bits), slice_stats(wd)
    alpha, err = sum_aware_scale(wd, q, sum_weight, stats, w.dtype)
    for _ in range(rounds):
        q_new = codes_for_scale(wd, alpha, bits)
        alpha_new, err_new = sum_aware_scale(wd, q_new, sum_weight, stats, w.dtype)
        better = err_new < err
        q = torch.where(better[:, None], q_new, q)
        alpha, err = torch.where(better, alpha_new, alpha), torch.where(better, err_new, err)
    return q.to(w.dtype), alpha.to(w.dtype)


@pytest.mark.parametrize("sum_weight", [0.0, 0.466])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_refining_only_the_improved_slices_is_refining_all(bits, sum_weight, dtype):
    """fit_l2 refits, each round, only the slices the round before improved: bit for bit what
    refitting every slice every round gives, for every round count."""
    w = torch.cat([_rows(1000, 32, seed=bits, dtype=dtype), torch.zeros(20, 32, dtype=dtype)])
    w[:200] = w[:200] ** 3  # heavy tails
    w[700:, 9:] = 0  # short (ragged) slices
    for rounds in (1, 2, 4, 12):
        q, alpha = fit_l2(w, bits, rounds=rounds, sum_weight=sum_weight)
        q_ref, alpha_ref = _refine_every_slice(w, bits, rounds, sum_weight)
        assert torch.equal(q, q_ref) and torch.equal(alpha, alpha_ref), f"rounds={rounds}"


@pytest.mark.parametrize("slices", [1, 2, 3])
def test_refining_few_long_slices_is_refining_all(slices):
    """Rows of 40 000 numbers, which torch sums in parallel when one is summed alone."""
    for seed in range(4):
        w = _rows(slices, 40_000, seed=seed) ** 3
        q, alpha = fit_l2(w, 3, rounds=5, sum_weight=0.466)
        q_ref, alpha_ref = _refine_every_slice(w, 3, 5, 0.466)
        assert torch.equal(q, q_ref) and torch.equal(alpha, alpha_ref), f"seed={seed}"


# --------------------------------------------------------------------------- quantize_weight end to end
@pytest.mark.parametrize(
    "shape,block,layout,groups",
    [
        ((6, 40, 3, 3), 32, "auto", 1),  # channel, ragged last block
        ((4, 3, 7, 7), 32, "auto", 1),  # stem: channel blocks of 3 (plain conv)
        ((8, 1, 3, 3), 32, "auto", 8),  # depthwise -> flat, 9 per slice
        ((8, 2, 3, 3), 4, "auto", 4),  # grouped -> flat, ragged (18 = 4 * 4 + 2)
        ((5, 8, 3, 3), 4, "auto", 2),  # grouped but groups wide enough -> channel
        ((5, 7, 3, 3), 1, "auto", 1),  # block 1: every weight its own scale
        ((5, 7, 3, 3), 16, "flat", 1),  # forced flat
        ((5, 7, 3, 3), 16, "channel", 7),  # forced channel
    ],
)
def test_quantize_weight_matches_naive_reference(shape, block, layout, groups):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    qw = quantize_weight(w, WeightFormat(bits=4, block=block, rounds=0, layout=layout, sum_weight=0.0), groups)
    kind = ref_layout(shape[1], block, groups) if layout == "auto" else layout
    assert qw.layout.kind == kind
    assert qw.vqk.shape == w.shape and qw.vqk.dtype == torch.int8
    assert tuple(qw.kds.shape) == ref_scale_shape(shape, kind, block) and qw.kds.dtype == torch.float32
    codes = dict(ref_slices(qw.vqk.float(), kind, block))
    for idx, s in ref_slices(w, kind, block):
        q_ref, a_ref = ref_l2_slice(s.numpy(), 4)
        assert codes[idx].tolist() == q_ref.tolist(), idx
        assert qw.kds[idx].item() == pytest.approx(a_ref, rel=1e-5, abs=1e-12), idx
    deq = dequantize(qw.vqk, qw.kds, qw.layout)
    assert torch.allclose(deq.double(), ref_dequantize(qw.vqk, qw.kds, kind, block), rtol=1e-6, atol=1e-7)
    assert torch.equal(qw.dequantize(), deq)


def test_quantize_weight_linear():
    w = torch.randn(7, 70, generator=torch.Generator().manual_seed(1))
    qw = quantize_weight(w, WeightFormat(bits=4, block=32, rounds=0, sum_weight=0.0))
    assert qw.vqk.shape == (7, 70)
    assert qw.kds.numel() == 7 * 3
    deq = qw.dequantize()
    assert deq.shape == (7, 70)
    for o in range(7):
        for j in range(3):
            s = w[o, 32 * j : 32 * (j + 1)]
            q_ref, a_ref = ref_l2_slice(s.numpy(), 4)
            assert qw.vqk[o, 32 * j : 32 * (j + 1)].tolist() == q_ref.astype(int).tolist()
            expected = torch.from_numpy(q_ref.astype(np.float64) * a_ref)
            assert torch.allclose(deq[o, 32 * j : 32 * (j + 1)].double(), expected, atol=1e-6)


def test_quantize_weight_error_shrinks_with_bits():
    w = torch.randn(16, 64, 3, 3, generator=torch.Generator().manual_seed(2))
    errs = []
    for bits in range(2, 9):
        deq = quantize_weight(w, WeightFormat(bits=bits)).dequantize()
        errs.append(((deq - w) ** 2).sum().item() / (w**2).sum().item())
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    # about 6 dB per bit: 8-bit relative squared error is tiny
    assert errs[-1] < 1e-4


def test_quantize_weight_does_not_modify_input():
    w = torch.randn(4, 40, 3, 3)
    before = w.clone()
    quantize_weight(w, WeightFormat())
    assert torch.equal(w, before)


# --------------------------------------------------------------------------- KL
def _scipy_kl_alpha(w: np.ndarray, q: np.ndarray, near: float) -> float:
    lp = log_softmax(w)
    p = np.exp(lp)

    def kl(a):
        return float(np.sum(p * (lp - log_softmax(a * q))))

    lo, hi = sorted((near * 0.05, near * 20))
    bounded = minimize_scalar(kl, bounds=(lo, hi), method="bounded", options={"xatol": 1e-12})
    return float(bounded.x)


@pytest.mark.parametrize("scale", [0.05, 1.0, 4.0])
def test_fit_kl_matches_scipy(scale):
    w = _rows(12, 16, seed=int(scale * 100), scale=scale)
    mask = torch.ones_like(w, dtype=torch.bool)
    mask[::3, 11:] = False  # ragged slices: 11 real entries, 5 padding zeros
    w = torch.where(mask, w, torch.zeros_like(w))
    q, alpha = fit_kl(w, 4, mask=mask)
    q_l2, _ = fit_l2(w, 4, rounds=0)
    assert torch.equal(q, q_l2)  # codes from the paper's map
    for r in range(len(w)):
        m = mask[r]
        wr, qr = w[r][m].double().numpy(), q[r][m].double().numpy()
        _, a_l2 = ref_l2_slice(wr, 4)
        expected = _scipy_kl_alpha(wr, qr, a_l2)
        assert alpha[r].item() == pytest.approx(expected, rel=1e-4), (r, scale)


def test_fit_kl_mask_excludes_padding():
    """A padded slice with the mask gives the same alpha as the short slice on its own."""
    w = _rows(5, 32, seed=3)
    mask = torch.zeros_like(w, dtype=torch.bool)
    lengths = [32, 9, 1, 20, 31]
    for r, n in enumerate(lengths):
        mask[r, :n] = True
    w = torch.where(mask, w, torch.zeros_like(w))
    _, alpha = fit_kl(w, 4, mask=mask)
    for r, n in enumerate(lengths):
        _, a_short = fit_kl(w[r : r + 1, :n], 4)
        assert alpha[r].item() == pytest.approx(a_short.item(), rel=1e-5)
    # without the mask the padding counts in the softmax, which changes the answer
    short = torch.zeros(1, 32)
    short[0, :2] = torch.tensor([3.0, -1.0])
    keep = torch.zeros(1, 32, dtype=torch.bool)
    keep[0, :2] = True
    _, masked = fit_kl(short, 4, mask=keep)
    _, unmasked = fit_kl(short, 4)
    _, alone = fit_kl(short[:, :2], 4)
    assert masked.item() == pytest.approx(alone.item(), rel=1e-5)
    assert abs(unmasked.item() - masked.item()) > 1e-3 * abs(masked.item())


def test_fit_kl_degenerate_slices_are_finite():
    w = torch.zeros(4, 8)
    w[1] = 0.5  # all-equal values: all codes equal, KL flat in alpha
    w[2, 0] = -3.0  # a single non-zero entry
    w[3] = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    q, alpha = fit_kl(w, 4)
    assert torch.isfinite(q).all() and torch.isfinite(alpha).all()
    assert alpha[0] == 0 and torch.all(q[0] == 0)
    assert torch.all(q[1] == -8)
    mask = torch.ones_like(w, dtype=torch.bool)
    mask[:, 4:] = False
    q, alpha = fit_kl(torch.where(mask, w, torch.zeros_like(w)), 4, mask=mask)
    assert torch.isfinite(alpha).all()


def test_kl_method_through_quantize_weight():
    w = torch.randn(4, 40, 3, 3, generator=torch.Generator().manual_seed(8))
    qw = quantize_weight(w, WeightFormat(bits=4, block=32, method="kl"))
    ql2 = quantize_weight(w, WeightFormat(bits=4, block=32, rounds=0, sum_weight=0.0))
    assert torch.equal(qw.vqk, ql2.vqk)  # same codes, different scales
    assert not torch.allclose(qw.kds, ql2.kds)
    # check one ragged slice (channels 32..39 at o=1, tap (2, 0)) against scipy
    s = w[1, 32:40, 2, 0].double().numpy()
    q = qw.vqk[1, 32:40, 2, 0].double().numpy()
    _, a_l2 = ref_l2_slice(s, 4)
    assert qw.kds[1, 1, 2, 0].item() == pytest.approx(_scipy_kl_alpha(s, q, a_l2), rel=1e-4)


# --------------------------------------------------------------------------- formats
BAD_BITS = [0, 1, 9, 16, -4, True, False, 2.5, 4.0, "4", None]
BAD_BLOCKS = [0, -1, True, 2.0, "32", None]


@pytest.mark.parametrize("bits", BAD_BITS)
def test_weight_format_rejects_bits(bits, one_line_dsq_error):
    one_line_dsq_error(WeightFormat, bits=bits)


@pytest.mark.parametrize("bits", BAD_BITS)
def test_act_format_rejects_bits(bits, one_line_dsq_error):
    one_line_dsq_error(ActFormat, bits=bits)


@pytest.mark.parametrize("block", BAD_BLOCKS)
def test_formats_reject_block(block, one_line_dsq_error):
    one_line_dsq_error(WeightFormat, block=block)
    one_line_dsq_error(ActFormat, block=block)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(method="l1"),
        dict(method=None),
        dict(rounds=-1),
        dict(rounds=1.5),
        dict(rounds=True),
        dict(layout="rows"),
        dict(layout=None),
        dict(sum_weight=-0.1),
        dict(sum_weight=float("inf")),
        dict(sum_weight=float("nan")),
        dict(sum_weight="0.5"),
    ],
)
def test_weight_format_rejects_other_settings(kwargs, one_line_dsq_error):
    one_line_dsq_error(WeightFormat, **kwargs)


@pytest.mark.parametrize("bits", range(2, 9))
def test_formats_accept_bits_2_to_8(bits):
    assert WeightFormat(bits=bits).bits == bits
    assert ActFormat(bits=bits).bits == bits


@pytest.mark.parametrize("block", [1, 7, 32, 4096])
def test_formats_accept_blocks(block):
    assert WeightFormat(block=block).block == block
    assert ActFormat(block=block).block == block
    assert WeightFormat(rounds=0, method="kl", layout="flat").layout == "flat"


def test_dsq_error_is_value_error():
    assert issubclass(DsqError, ValueError)


# --------------------------------------------------------------------------- hostile values and arguments
@pytest.mark.parametrize("power", [-130, -140])
@pytest.mark.parametrize("rounds", [0, 5])
def test_l2_fit_of_denormal_slices_is_the_scaled_normal_fit(power, rounds):
    """The fit runs in float64: 2^k * w (denormal) fits like w, scaled."""
    w = torch.tensor([[1.0, 0.0, 1.0, -0.375], [0.0, 0.0, 0.0, 0.0], [-1.0, 0.5, 0.0, 0.25]])
    q, alpha = fit_l2(w, 4, rounds)
    q_k, alpha_k = fit_l2(w * 2.0**power, 4, rounds)
    assert torch.equal(q_k, q)  # main gave NaN codes for denormal slices (0 * inf)
    assert torch.allclose(alpha_k.double(), alpha.double() * 2.0**power, rtol=1e-4, atol=0)


@pytest.mark.parametrize("method", ["l2", "kl"])
@pytest.mark.parametrize("value", [3e38, torch.finfo(torch.float32).max])
def test_weights_near_the_float32_max_give_finite_scales_and_weights(method, value):
    w = torch.tensor([value, -value, value / 3, 0.0]).reshape(1, 4, 1, 1)
    for bits in (2, 4, 8):
        qw = quantize_weight(w, WeightFormat(bits=bits, block=4, method=method))
        assert torch.isfinite(qw.kds).all() and torch.isfinite(qw.dequantize()).all()  # main: inf / nan


def test_a_scale_that_would_overflow_is_the_largest_finite_one():
    """2 bits, w = [m, -m]: q = [-2, 1] and the least-squares alpha -0.6 m makes alpha * q = 1.2 m,
    past the float32 max for m = 3e38: alpha is limited to the largest scale that keeps it finite."""
    w = torch.tensor([[3e38, -3e38]])
    q, alpha = fit_l2(w, 2, rounds=0)
    assert q.tolist() == [[-2.0, 1.0]]
    assert torch.isfinite(alpha * q).all()
    assert (alpha * -2).item() == pytest.approx(torch.finfo(torch.float32).max, rel=1e-6)


@pytest.mark.parametrize("power", [55, 57, 60, 80, 120])
def test_kl_scale_of_tiny_weights_keeps_its_sign_and_value(power):
    """Tiny weights make softmax(w) nearly flat; main's Newton steps then followed rounding noise
    (alpha off by 80 % or of the wrong sign at 1e-16). The limit is the centred least-squares scale."""
    w = _rows(64, 16, seed=1) * 2.0**-power
    q, alpha = fit_kl(w, 4)
    qc, wc = q.double() - q.double().mean(1, keepdim=True), w.double() - w.double().mean(1, keepdim=True)
    expected = (wc * qc).sum(1) / (qc * qc).sum(1)
    assert torch.allclose(alpha.double(), expected, rtol=1e-4, atol=0)


def test_refinement_stops_once_no_slice_improves(monkeypatch):
    """A fixed point repeats itself: an absurd round count (--rounds 1000000000) costs a few rounds."""
    import dsq.formats.weights as weights

    original, calls = weights.codes_for_scale, []

    def counting(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(weights, "codes_for_scale", counting)
    w = _rows(50, 32, seed=3)
    q, alpha = fit_l2(w, 3, rounds=10_000)
    assert len(calls) < 100
    monkeypatch.undo()
    q_ref, alpha_ref = fit_l2(w, 3, rounds=len(calls) + 5)
    assert torch.equal(q, q_ref) and torch.equal(alpha, alpha_ref)


@pytest.mark.parametrize(
    "weight",
    [
        torch.ones(2, 3, 3, 3, dtype=torch.int64),  # main quantized integers silently
        torch.ones(2, 3, 3, 3, dtype=torch.bool),
        torch.ones(2, 3, 3),  # a Conv1d weight
        torch.ones(6),
        torch.tensor([[1.0, float("nan")]]),  # main: the slice's scale became 0, silently
        torch.tensor([[1.0, float("inf")]]),
        torch.tensor([[1.0, 1e300]], dtype=torch.float64),  # beyond float32
    ],
)
def test_quantize_weight_refuses_what_it_cannot_quantize(weight, one_line_dsq_error):
    one_line_dsq_error(quantize_weight, weight, WeightFormat())


@pytest.mark.parametrize(
    "call",
    [
        lambda w: fit_l2(w, 1),
        lambda w: fit_l2(w, 9),
        lambda w: fit_l2(w, 4.0),
        lambda w: fit_l2(w, 4, rounds=-1),
        lambda w: fit_l2(w, 4, sum_weight=-1.0),
        lambda w: fit_l2(w, 4, sum_weight=1e300),
        lambda w: fit_kl(w, 0),
    ],
)
def test_fits_check_their_arguments(call, one_line_dsq_error):
    one_line_dsq_error(call, _rows(3, 8))


@pytest.mark.parametrize("sum_weight", [1e7, 1e300, True])
def test_weight_format_rejects_an_absurd_sum_weight(sum_weight, one_line_dsq_error):
    """Past 1e6 the slice sum alone decides alpha; 1e300 overflowed the fit's sums into NaN scales."""
    assert "sum weight" in one_line_dsq_error(WeightFormat, sum_weight=sum_weight)
