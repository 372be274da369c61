"""Data-aware VQK and KDS: minimise the layer's output error E[((w - alpha q) . x)^2] on the
calibration inputs x instead of the weight error alone.

With H = E[x x^T] (per group, over the unfolded input) the output error of one weight row is
(w - w_hat)^T H (w - w_hat). Two steps, both closed form:

1. Integers, column by column (the GPTQ / optimal-brain-quantization update): each slice's
   scale is fitted (L2, as data-free) to the row as it stands when the slice is reached; each
   weight is rounded, and its error is pushed onto the weights not yet rounded through H^-1,
   so that they compensate it.
2. Scales: with the integers fixed, all KDS of a row solve one small least-squares problem in
   the H-norm (the normal equations Q^T H Q alpha = Q^T H w).
"""

from __future__ import annotations

import torch

from ..formats import BlockLayout, fit_l2, round_scales
from ..formats.weights import code_range

DAMPING = 0.1  # added to H's diagonal, as a fraction of its mean: see the docstring of _damped


def slice_columns(layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns (of one weight row, unfolded as I*kh*kw) of every slice, slice after slice in
    KDS order, and the length of each slice."""
    _, i, kh, kw = layout.shape
    one_row = BlockLayout(layout.kind, layout.block, (1, i, kh, kw))
    index = one_row.to_slices(torch.arange(1, i * kh * kw + 1).reshape(1, i, kh, kw))
    lengths = (index > 0).sum(1)
    return index[index > 0] - 1, lengths


def _damped(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """H with damping on the diagonal; inputs that are always zero get a unit diagonal (their
    weights, zeroed in `weight` in place, do not matter).

    The damping (DAMPING times the mean diagonal) pulls H towards a multiple of the identity,
    the data-free fit's norm. GPTQ uses 0.01; dsq 0.1, because a refit on few images overfits
    the layers whose inputs are wide and small (EfficientNet-Lite0's last pointwise convs: 1152
    inputs at 7x7): on images it did not see, their output error came out 4.0-4.3x their error on
    the calibration images at 0.01 and 2.9-3.1x at 0.1 (50 images; docs/calibration.md).
    """
    h = h.clone()
    diag = h.diagonal(dim1=1, dim2=2)
    dead = diag == 0
    weight.masked_fill_(dead[:, None, :], 0)
    diag.masked_fill_(dead, 1)
    diag += DAMPING * diag.mean(1, keepdim=True)
    return h


def round_with_compensation(
    w: torch.Tensor, h: torch.Tensor, lengths: list[int], bits: int, rounds: int, sum_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1 on rows w (G, R, D) whose columns are ordered slice after slice, H (G, D, D):
    the codes (G, R, D) and one scale per row and slice (G, R, S)."""
    w = w.clone()
    lo, hi = code_range(bits)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes, scales, start = torch.empty_like(w), [], 0
    for length in lengths:
        end = start + length
        g, r, _ = w.shape
        _, alpha = fit_l2(w[:, :, start:end].reshape(g * r, length), bits, rounds, sum_weight)
        alpha = alpha.reshape(g, r)
        inv = torch.where(alpha == 0, 0.0, 1 / torch.where(alpha == 0, 1.0, alpha))
        errors = torch.empty(g, r, length, dtype=w.dtype)
        for j in range(start, end):  # within the slice, one column at a time
            q = torch.round(w[:, :, j] * inv).clamp_(lo, hi)
            codes[:, :, j] = q
            errors[:, :, j - start] = err = (w[:, :, j] - alpha * q) / u[:, j, j, None]
            w[:, :, j + 1 : end] -= err[:, :, None] * u[:, None, j, j + 1 : end]
        w[:, :, end:] -= errors @ u[:, start:end, end:]  # the later columns, in one product per slice
        scales.append(alpha)
        start = end
    return codes, torch.stack(scales, 2)


def output_error_scales(w: torch.Tensor, codes: torch.Tensor, h: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Step 2: the scales (G, R, S) minimising (w - w_hat)^T H (w - w_hat) per row for fixed codes.

    Row r's normal matrix is N[s, t] = sum over columns i of slice s and j of slice t of
    q_i H_ij q_j, i.e. Q^T H Q with Q holding row r's codes slice by slice in its columns (the
    slices padded to one length, so that both products are batched matrix products).
    """
    g, r, d = w.shape
    s, width = len(lengths), max(lengths)
    place = torch.cat([k * width + torch.arange(n) for k, n in enumerate(lengths)])  # padded position of each column
    q = torch.zeros(g, r, s * width, dtype=h.dtype).index_copy_(2, place, codes.to(h.dtype))
    hp = torch.zeros(g, s * width, s * width, dtype=h.dtype)
    hp[:, place[:, None], place[None, :]] = h
    rhs = (q * torch.zeros_like(q).index_copy_(2, place, w.to(h.dtype) @ h)).view(g, r, s, width).sum(-1)
    q3 = q.view(g, r, s, width)
    hq = torch.einsum("gitw,grtw->grit", hp.view(g, s * width, s, width), q3)  # H Q: (G, R, padded D, S)
    normal = torch.einsum("grsw,grswt->grst", q3, hq.view(g, r, s, width, s))
    diag = normal.diagonal(dim1=2, dim2=3)
    empty = diag <= 0  # all-zero codes: scale 0
    diag += torch.where(empty, 1.0, 1e-6 * diag)
    alpha = torch.linalg.solve(normal, rhs.masked_fill(empty, 0))
    return alpha.masked_fill(empty, 0)


def fit_to_inputs(
    weight: torch.Tensor, second: torch.Tensor, layout: BlockLayout, bits: int, rounds: int, sum_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """VQK (int8, the weight's shape) and KDS (float32, the layout's scale shape) for a float
    `weight` (O, I/G, kh, kw) or (O, I) whose inputs have second moments `second` (G, D, D)."""
    groups = second.shape[0]
    w = weight.detach().double().reshape(groups, weight.shape[0] // groups, -1)
    columns, lengths = slice_columns(layout)
    order = columns.to(w.device)
    w, h = w[:, :, order].contiguous(), second[:, order][:, :, order]
    h = _damped(h, w)
    codes, _ = round_with_compensation(w, h, lengths.tolist(), bits, rounds, sum_weight)
    alpha = output_error_scales(w, codes, h, lengths.tolist())
    vqk = torch.empty_like(codes)
    vqk[:, :, order] = codes
    return (vqk.reshape(weight.shape).to(torch.int8), alpha.reshape(layout.scale_shape).float())


def refit_layer(layer: torch.nn.Module, weight: torch.Tensor, second: torch.Tensor, name: str) -> None:
    """Set a DSConv layer's VQK and KDS to `fit_to_inputs` of the float `weight` on inputs of
    second moments `second`, in the layer's own format (scales rounded to its scale dtype)."""
    fmt = layer.weight_format
    vqk, kds = fit_to_inputs(weight, second, layer.layout, fmt.bits, fmt.rounds, fmt.sum_weight)
    layer.vqk.copy_(vqk)
    layer.kds.copy_(round_scales(kds, fmt.scale_dtype, f"layer {name!r}"))
