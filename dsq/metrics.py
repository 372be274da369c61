"""How far a quantized tensor is from its float original, and how many bytes a model holds."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise): infinite without noise."""
    return 10 * math.log10(signal / noise) if noise else math.inf


def weight_error(w: torch.Tensor, wq: torch.Tensor) -> tuple[float, float]:
    """Weight SQNR in dB and relative L2 error."""
    wd = w.double()
    difference = wd - wq  # wq promoted to float64, as wq.double() would be
    noise = difference.square_().sum().item()
    signal = torch.square(wd, out=difference).sum().item()  # in the difference's memory
    rel = math.sqrt(noise / signal) if signal else 0.0
    return sqnr_db(signal, noise), rel


def state_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, as the model holds them."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
