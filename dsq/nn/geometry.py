"""Conv geometry on channels-last tensors: F.conv2d's padding as F.pad amounts, and the input
each output position reads at each kernel tap (an im2col as a strided view)."""

from __future__ import annotations

import torch
from torch.nn.modules.utils import _pair


def pad_amounts(padding, kernel: tuple[int, int], dilation: tuple[int, int]) -> list[int]:
    """F.conv2d's padding argument ("valid", "same", an int or a pair) as F.pad amounts
    (left, right, top, bottom)."""
    if padding == "valid":
        return [0, 0, 0, 0]
    if padding == "same":  # as torch: the odd pixel goes to the right / bottom
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return [total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2]
    ph, pw = _pair(padding)
    return [pw, pw, ph, ph]


def output_size(height: int, width: int, kernel, stride, dilation) -> tuple[int, int]:
    """(OH, OW): the output positions of a conv over an (already padded) height x width input."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    return (height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1


def patches(t: torch.Tensor, kernel, stride, dilation) -> torch.Tensor:
    """(N, H, W, D) -> (N, OH, OW, kh * kw, D): what each output position reads at each tap."""
    t = t.contiguous()
    n, h, w, d = t.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    oh, ow = output_size(h, w, kernel, stride, dilation)
    s_n, s_h, s_w, s_d = t.stride()
    view = t.as_strided((n, oh, ow, kh, kw, d), (s_n, s_h * sh, s_w * sw, s_h * dh, s_w * dw, s_d))
    return view.reshape(n, oh, ow, kh * kw, d)
