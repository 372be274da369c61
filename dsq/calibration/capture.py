"""See each conv/linear layer's actual call: the input its F.conv2d / F.linear receives (after
the layer's own padding and BFP rounding), in execution order, and the output it returns."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

from ..nn.geometry import pad_amounts

KERNELS = (F.conv2d, F.linear)


@dataclass
class Call:
    """One layer's kernel call: F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    or F.linear(input, weight, bias), with its arguments by name."""

    name: str
    layer: nn.Module
    func: Callable
    input: torch.Tensor
    options: dict

    def run(self, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The call's result, optionally with another weight or bias."""
        weight = self.layer.weight if weight is None else weight
        bias = self.layer.bias if bias is None else bias
        return self.func(self.input, weight, bias, **self.options)

    @property
    def channel_dim(self) -> int:
        """The output's channel axis."""
        return -1 if self.func is F.linear else 1

    def part(self, start: int, stop: int) -> "Call":
        """The same call on images start:stop of the input only."""
        return Call(self.name, self.layer, self.func, self.input[start:stop], self.options)

    def patches(self) -> torch.Tensor:
        """(groups, D, M): the M input vectors that each group's weight rows (D long) multiply."""
        if self.func is F.linear:
            return self.input.reshape(-1, self.input.shape[-1]).T[None]
        o = self.options
        kernel = self.layer.weight.shape[-2:]
        pads = pad_amounts(o["padding"], kernel, _pair(o["dilation"]))
        if tuple(kernel) == (1, 1) and not any(pads):  # a 1x1 conv multiplies each position: no unfold
            sh, sw = _pair(o["stride"])
            cols = self.input[:, :, ::sh, ::sw].flatten(2)
        else:
            cols = F.unfold(F.pad(self.input, pads), kernel, dilation=o["dilation"], stride=o["stride"])
        return cols.unflatten(1, (o["groups"], -1)).permute(1, 2, 0, 3).flatten(2)  # cols: (N, C*kh*kw, L)


def _options(func, args, kwargs) -> tuple[torch.Tensor, dict]:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    bound = dict(zip(names, args)) | kwargs
    defaults = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1} if func is F.conv2d else {}
    options = {k: bound.get(k, v) for k, v in defaults.items()}
    return bound["input"], options


class _Router(TorchFunctionMode):
    def __init__(self, handler):
        super().__init__()
        self.handler, self.current = handler, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in KERNELS and self.current is not None:
            name, layer = self.current
            self.current = None  # one kernel call per layer
            x, options = _options(func, args, kwargs)
            return self.handler(Call(name, layer, func, x, options))
        return func(*args, **kwargs)


@contextmanager
def route_calls(model: nn.Module, handler: Callable[[Call], torch.Tensor], layers: dict[str, nn.Module]):
    """While active, the kernel call of each layer in `layers` (name -> module of `model`) goes to
    `handler(call)`, whose return value is the layer's result (`call.run()` keeps it as it was)."""
    router = _Router(handler)
    names = {id(m): n for n, m in layers.items()}

    def enter(module, args):
        router.current = (names[id(module)], module)

    def leave(module, args, output):
        router.current = None

    hooks = [h for m in layers.values() for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with router:
            yield
    finally:
        for h in hooks:
            h.remove()
