"""What one image costs the float model: multiply-accumulates and activation values written,
counted once by running it on one image (deterministic: the same on every machine)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

# On CPUs a CNN's time goes as much to moving activations as to multiplying: one activation value
# written (and read again) costs about as long as ELEMENT_MACS multiply-accumulates (fitted to the
# forward times of VGG-11, ResNet-18/50, MobileNetV2 and EfficientNet-Lite0 on 2 cores: ~140;
# docs/calibration.md), so that depthwise-heavy networks are not counted as cheap.
ELEMENT_MACS = 128


class _Elements(TorchDispatchMode):
    """Counts the values that operators write (views write none) and the largest output."""

    def __init__(self):
        super().__init__()
        self.total = self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.total += sum(sizes)
            self.largest = max([self.largest, *sizes])
        return out


@dataclass(frozen=True)
class ImageCost:
    """One image through the float model: multiply-accumulates, activation values written, and
    the largest single activation (values)."""

    macs: int
    elements: int
    largest: int

    @property
    def work(self) -> int:
        """Multiply-accumulate equivalents of one forward pass."""
        return self.macs + ELEMENT_MACS * self.elements

    def to_dict(self) -> dict:
        return {"macs": self.macs, "elements": self.elements, "largest": self.largest, "work": self.work}


@contextmanager
def evaluating(model: nn.Module):
    """`model` in eval mode, without gradients, while active; its mode as it was after."""
    training = model.training
    try:
        with torch.no_grad():
            yield model.eval()
    finally:
        model.train(training)


def image_cost(model: nn.Module, image: torch.Tensor) -> ImageCost:
    """The ImageCost of `model` (in eval mode) on `image` (1, C, H, W)."""
    flops, elements = FlopCounterMode(display=False), _Elements()
    with evaluating(model), flops, elements:
        model(image)
    return ImageCost(flops.get_total_flops() // 2, elements.total, elements.largest)
