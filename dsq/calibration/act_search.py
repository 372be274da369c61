"""Per-layer activation settings chosen on the calibration images: for each layer with a BFP
input, the mantissa bits and block size that keep its output closest to the output with a float
input, at no more bits per activation than its current setting (docs/activation-search.md)."""

from __future__ import annotations

from fractions import Fraction

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..formats import ActFormat, bfp_quantize
from ..formats.spec import MIN_BITS
from ..metrics import sqnr_db
from .capture import Call, route_calls

EXPONENT_BITS = 8  # the shared exponent of a block
BLOCKS = (4, 8, 16, 32, 64, 128)
MANTISSA_STEPS_DOWN = 2  # candidates have act_bits - 2 .. act_bits mantissa bits


def bits_per_activation(fmt: ActFormat) -> Fraction:
    """Mantissa bits plus each activation's share of its block's exponent, exactly."""
    return fmt.bits + Fraction(EXPONENT_BITS, fmt.block)


def candidates(current: ActFormat) -> list[ActFormat]:
    """The settings that cost at most `current` per activation, `current` first."""
    budget = bits_per_activation(current)
    bits = range(max(MIN_BITS, current.bits - MANTISSA_STEPS_DOWN), current.bits + 1)
    cheaper = [
        ActFormat(b, block)
        for b in bits
        for block in BLOCKS
        if bits_per_activation(ActFormat(b, block)) <= budget and ActFormat(b, block) != current
    ]
    return [current, *cheaper]


def rounded_call(call: Call, fmt: ActFormat) -> Call:
    """The same call with its input rounded to `fmt`."""
    return Call(call.name, call.layer, call.func, bfp_quantize(call.input, fmt, call.layer.act_dim), call.options)


def candidate_sqnr(call: Call, fmt: ActFormat, chunk: int = 64) -> float:
    """SQNR (dB) of the layer's output with its input (unrounded in `call`) rounded to `fmt`,
    against its output on the unrounded input; `chunk` images at a time."""
    signal = noise = 0.0
    for start in range(0, len(call.input), chunk):
        part = call.part(start, start + chunk)
        exact = part.run().double()
        rounded = rounded_call(part, fmt).run().double()
        signal += exact.square().sum().item()
        noise += (exact - rounded).square().sum().item()
    return sqnr_db(signal, noise)


def search_act_formats(
    qmodel: nn.Module, layers: dict[str, nn.Module], images: torch.Tensor, *, progress: bool = False
) -> dict[str, ActFormat]:
    """Give every layer of `layers` (name -> DSConv module of `qmodel`) that has a BFP input the
    candidate setting with the best output SQNR on `images` (ties: its current one), layer by
    layer in execution order, each on the inputs that the settings chosen before it produce.
    Returns the chosen setting per searched layer."""
    searched = {name: m for name, m in layers.items() if m.act_format is not None}
    current = {name: m.act_format for name, m in searched.items()}
    chosen: dict[str, ActFormat] = {}
    bar = tqdm(total=len(searched), desc="activation search", unit="layer", disable=not progress)

    def choose(call: Call) -> torch.Tensor:
        options = candidates(current[call.name])
        scores = [candidate_sqnr(call, fmt) for fmt in options]
        best = options[scores.index(max(scores))]  # the first best: the current setting on a tie
        chosen[call.name] = call.layer.act_format = best
        bar.update()
        return rounded_call(call, best).run()

    for layer in searched.values():
        layer.act_format = None  # so that each call sees its unrounded input
    try:
        with torch.no_grad(), route_calls(qmodel, choose, searched):
            qmodel(images)
    finally:
        bar.close()
        for name, layer in searched.items():
            layer.act_format = chosen.get(name, current[name])
    return chosen
