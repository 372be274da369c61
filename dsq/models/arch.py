"""The description of one supported architecture: how to build it and where its weights come from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

StateDict = dict[str, Tensor]


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
    keys the skeleton deliberately lacks (e.g. training-only auxiliary heads).
    """

    name: str
    preset: str
    num_classes: int
    build: Callable[[int], nn.Module]
    pretrained: Callable[[], tuple[StateDict, float | None]] | None = None
    top1_of_file: Callable[[str], float | None] = _unknown_top1
    adapt: Callable[[StateDict], StateDict] = _unchanged
