"""The `weight` of a DSConv layer under a backend with its own conv and linear ("int", "exact")."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils._pytree import tree_map_only

from ..formats import dequantize


class StandInWeight(torch.Tensor):
    """A DSConv layer's `weight` with the weight's shape, dtype and device but no float storage.
    F.conv2d or F.linear called with it run the backend's `kernels`, whoever calls them
    (nn.Conv2d's forward, or a subclass that pads first); any other use sees the dequantized
    weight alpha * q."""

    kernels: dict[Callable, Callable] = {}  # F.conv2d / F.linear -> the backend's version, same arguments

    @staticmethod
    def __new__(cls, layer):
        self = torch.Tensor._make_wrapper_subclass(cls, layer.vqk.shape, dtype=layer.kds.dtype, device=layer.vqk.device)
        self.layer = layer
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.shape)}, layer={type(self.layer).__name__})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        if isinstance(weight, StandInWeight) and func in weight.kernels:
            return weight.kernels[func](*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def dequantized(w: StandInWeight) -> torch.Tensor:
            return dequantize(w.layer.vqk, w.layer.kds, w.layer.layout).reshape(w.shape)

        args, kwargs = tree_map_only(StandInWeight, dequantized, (args, kwargs or {}))
        return func(*args, **kwargs)
