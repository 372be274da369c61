"""Per-layer output SQNR: each quantized layer's output against the float layer's, on the same images."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..metrics import sqnr_db


@contextmanager
def _on_outputs(model: nn.Module, names: list[str], action):
    """While active, `action(name, output)` sees the output of each named module of `model`."""
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(lambda m, a, out, n=n: action(n, out)) for n in names]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def output_sqnr(
    float_model: nn.Module,
    qmodel: nn.Module,
    names: list[str],
    images: torch.Tensor,
    chunk: int = 64,
    *,
    progress: bool = False,
    desc: str = "output SQNR",
) -> dict[str, float]:
    """10 log10(sum f^2 / sum (f - q)^2) per layer name, f and q the outputs of the layer of that
    name in the float and in the quantized network (each fed by its own network), `chunk` images
    at a time (holding the float network's outputs of one chunk)."""
    signal, noise = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    floats: dict[str, torch.Tensor] = {}

    def compare(name: str, q: torch.Tensor) -> None:
        f = floats.pop(name)
        signal[name] += f.square().sum(dtype=torch.float64).item()
        noise[name] += (f - q).square().sum(dtype=torch.float64).item()

    with _on_outputs(float_model, names, floats.__setitem__), _on_outputs(qmodel, names, compare):
        for start in tqdm(range(0, len(images), chunk), desc=desc, unit="batch", disable=not progress):
            x = images[start : start + chunk]
            float_model(x), qmodel(x)
    return {n: sqnr_db(signal[n], noise[n]) for n in names}
