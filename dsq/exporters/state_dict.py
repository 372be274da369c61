"""A quantized model as a plain torch state_dict: each DSConv weight dequantized (alpha * q) under
the float model's own key, VQK and KDS left out, so that the float architecture loads it with
`torch.load(weights_only=True)` and no dsq, and computes with the quantized weights."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..fileio import atomic_path
from ..formats import dequantize
from ..nn import frozen_layers


def dequantized_state_dict(qmodel: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict that the float model of `qmodel` takes, with every DSConv weight alpha * q
    (in the layer's dtype; float16 scales times integers are exact in float32), keys in the
    float model's order."""
    layers = dict(frozen_layers(qmodel, "exporting it"))
    state: dict[str, torch.Tensor] = {}
    for key, tensor in qmodel.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        layer = layers.get(owner)
        weight_key = f"{owner}.weight" if owner else "weight"
        if layer is not None and weight_key not in state:  # a layer's weight comes first, as in nn.Conv2d
            state[weight_key] = dequantize(layer.vqk, layer.kds, layer.layout).reshape(layer.vqk.shape).detach()
        if layer is None or leaf not in ("vqk", "kds"):
            state[key] = tensor.detach().clone()
    return state


def save_state_dict(qmodel: nn.Module, path) -> None:
    """Write `dequantized_state_dict(qmodel)` with torch.save, atomically."""
    state = dequantized_state_dict(qmodel)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
