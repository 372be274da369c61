"""Second moments of the vectors each layer's weight rows multiply, gathered over calibration images."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .capture import Call, route_calls

MOMENT_ELEMENTS = 2**25  # unfolded input values per chunk (128 MiB in float32, twice that while unfolding)


@dataclass
class InputMoments:
    """Per group: sum of x x^T (G, D, D) and of x (G, D) over `count` input vectors x."""

    outer: torch.Tensor
    total: torch.Tensor
    count: int

    @property
    def second(self) -> torch.Tensor:
        """E[x x^T] per group."""
        return self.outer / self.count

    @property
    def mean(self) -> torch.Tensor:
        """E[x] per group."""
        return self.total / self.count

    def add(self, patches: torch.Tensor) -> None:
        self.outer += (patches @ patches.transpose(1, 2)).double()
        self.total += patches.sum(2).double()
        self.count += patches.shape[2]


def input_moments(call: Call, elements: int = MOMENT_ELEMENTS) -> InputMoments:
    """The moments of what a layer's kernel multiplies in `call`: its padded, BFP-rounded input,
    unfolded, gathered in chunks of about `elements` unfolded values (the first image alone)."""
    first = call.part(0, 1).patches()
    g, d, _ = first.shape
    moments = InputMoments(torch.zeros(g, d, d, dtype=torch.float64), torch.zeros(g, d, dtype=torch.float64), 0)
    moments.add(first)
    chunk = max(1, elements // first.numel())
    for start in range(1, len(call.input), chunk):
        moments.add(call.part(start, start + chunk).patches())
    return moments


def output_means(
    model: nn.Module, layers: dict[str, nn.Module], images: torch.Tensor, chunk: int = 256
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Each layer's mean output per channel over the images, and the order in which the layers ran."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(call: Call) -> torch.Tensor:
        out = call.run()
        channels = out.movedim(call.channel_dim, -1).reshape(-1, out.shape[call.channel_dim])
        sums[call.name] = sums.get(call.name, 0) + channels.double().sum(0)
        counts[call.name] = counts.get(call.name, 0) + channels.shape[0]
        return out

    with torch.no_grad(), route_calls(model, record, layers):
        for start in range(0, len(images), chunk):
            model(images[start : start + chunk])
    return {n: sums[n] / counts[n] for n in sums}, list(sums)
