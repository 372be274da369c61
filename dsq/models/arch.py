"""The description of one supported architecture: how to build it and where its weights come from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

StateDict = dict[str, Tensor]


class _WeightsOnMeta(TorchFunctionMode):
    """Creates the tensors that layers make their weights with on the meta device (shapes, no
    memory); other tensors stay real, so architectures that compute their widths with tensors
    (RegNet) still build."""

    FACTORIES = frozenset({torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self.FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _unknown_top1(file_name: str) -> float | None:
    return None


def _unchanged(state_dict: StateDict) -> StateDict:
    return state_dict


@dataclass(frozen=True)
class Arch:
    """A buildable architecture.

    `build(num_classes)` makes a float skeleton; `pretrained()` (None when there are no
    published weights) returns the published state_dict and its ImageNet top-1;
    `top1_of_file(name)` recognises a published weights file by its name; `adapt` drops
    keys the skeleton deliberately lacks (e.g. training-only auxiliary heads); `layout_of`
    (None when there is one layout) picks, for an architecture that has several, the one a
    state_dict is in (timm's re-parameterisable models: the training form or the fused one).
    """

    name: str
    preset: str
    num_classes: int
    build: Callable[[int], nn.Module]
    pretrained: Callable[[], tuple[StateDict, float | None]] | None = None
    top1_of_file: Callable[[str], float | None] = _unknown_top1
    adapt: Callable[[StateDict], StateDict] = _unchanged
    layout_of: Callable[[StateDict], Arch] | None = None
    classifier: str | None = None  # state_dict key of the classifier's weight, if not the last Linear/Conv2d's

    def fitting(self, state_dict: StateDict) -> Arch:
        """This architecture in the layout `state_dict` is in."""
        return self if self.layout_of is None else self.layout_of(state_dict)

    def probe(self, num_classes: int) -> nn.Module:
        """The architecture with its weights on the meta device: names and shapes without memory,
        to check what a file holds before building the real model from it."""
        with _WeightsOnMeta():
            return self.build(num_classes)
