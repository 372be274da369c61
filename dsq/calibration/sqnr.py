"""Per-layer output SQNR: each quantized layer's output against the float layer's, on the same images."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..metrics import sqnr_db


def _outputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The output of each named module of `model` when it runs on x."""
    seen: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(lambda m, a, out, n=n: seen.__setitem__(n, out)) for n in names]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


@torch.no_grad()
def output_sqnr(
    float_model: nn.Module, qmodel: nn.Module, names: list[str], images: torch.Tensor, chunk: int = 64
) -> dict[str, float]:
    """10 log10(sum f^2 / sum (f - q)^2) per layer name, f and q the outputs of the layer of that
    name in the float and in the quantized network (each fed by its own network)."""
    signal, noise = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk]
        f, q = _outputs(float_model, names, x), _outputs(qmodel, names, x)
        for n in names:
            signal[n] += f[n].double().square().sum().item()
            noise[n] += (f[n].double() - q[n].double()).square().sum().item()
    return {n: sqnr_db(signal[n], noise[n]) for n in names}
