"""What happens to a conv's float64 sums on their way out (the int kernel's output epilogue).

    y = clamp(round_f32((sum + bias) * scale + shift) + residual, lo, hi)

`scale` and `shift` are a BatchNorm folded into the conv (float64, per output channel; absent
for none), `residual` a tensor added after rounding (a residual connection), and [lo, hi] the
clamp of a fused ReLU (0, inf) or ReLU6 (0, 6). Each step rounds once, in this order, in float64
and then float32, on every path (the C++ kernel, its torch reference, the eager int path and the
exact backend), so they agree bit for bit. Without a BatchNorm the steps are those of the
unfused layers (the conv's rounded output plus the residual, then the activation), so the result
is the unfused network's, bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Epilogue:
    """A folded BatchNorm (scale, shift) and an activation clamp [lo, hi]; the default does nothing."""

    scale: torch.Tensor | None = None  # (O,) float64
    shift: torch.Tensor | None = None  # (O,) float64
    lo: float = -math.inf
    hi: float = math.inf

    def apply(
        self, acc: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None, channel_dim: int = 1
    ) -> torch.Tensor:
        """float64 sums `acc` (channels along `channel_dim`) -> float32 outputs."""

        def per_channel(v: torch.Tensor) -> torch.Tensor:
            return v.detach().double().reshape(-1, *([1] * (acc.dim() - 1 - channel_dim % acc.dim())))

        if bias is not None:
            acc = acc + per_channel(bias)
        if self.scale is not None:
            acc = acc * per_channel(self.scale)
            acc = acc + per_channel(self.shift)
        return self.finish(acc.float(), residual)

    def finish(self, y: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The float32 steps: plus the residual, then the clamp."""
        if residual is not None:
            y = y + residual
        return y if (self.lo, self.hi) == (-math.inf, math.inf) else y.clamp(self.lo, self.hi)

    def rounding(self) -> Epilogue:
        """The float64 steps alone (no clamp), for a residual that is added afterwards."""
        return dataclasses.replace(self, lo=-math.inf, hi=math.inf)


@contextlib.contextmanager
def output_epilogue(layer: torch.nn.Module, epilogue: Epilogue, residual: torch.Tensor | None = None):
    """Within the block, the DSConv `layer`'s conv (its F.conv2d / F.linear call under the int or
    exact backend) ends with `epilogue` and adds `residual`: one call takes them."""
    layer.__dict__["_output_epilogue"] = (epilogue, residual)
    try:
        yield
    finally:
        untaken = layer.__dict__.pop("_output_epilogue", None)
    if untaken is not None:
        raise RuntimeError(
            "a fused DSConv layer did not run its conv on the int or exact backend: "
            "fused networks (dsq.nn.fuse_int) run on those only"
        )


def take_output_epilogue(layer: torch.nn.Module) -> tuple[Epilogue, torch.Tensor | None]:
    """The epilogue and residual that `output_epilogue` gave `layer` (once), else none."""
    return layer.__dict__.pop("_output_epilogue", (Epilogue(), None))


def batchnorm_epilogue(bn: torch.nn.BatchNorm2d, lo: float = -math.inf, hi: float = math.inf) -> Epilogue:
    """The eval-mode BatchNorm `bn` as a per-channel scale and shift in float64, with a clamp."""
    scale = (bn.running_var.double() + bn.eps).rsqrt()
    shift = -bn.running_mean.double() * scale
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
        shift = shift * bn.weight.detach().double() + bn.bias.detach().double()
    return Epilogue(scale.contiguous(), shift.contiguous(), lo, hi)
