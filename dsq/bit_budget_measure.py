"""What each weight bit width costs each layer, measured on images against the float network.

A layer's cost at b bits is the KL divergence that its b-bit output alone adds to the network's
output, to second order: with g the gradient of log p(y | x) at the layer's output (y drawn from
the float network's own prediction) and d the quantized layer's output minus the float layer's on
the same input, KL ≈ E[(g · d)^2] / 2 (the Fisher information of the output distribution). One
forward and `samples` backward passes per chunk of images measure every layer at every width at
once; the quantized outputs come from the layers `dsq.quantize` makes at each width, so formats,
layouts, BFP inputs and scale dtypes are those of the final model.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import QuantConfig
from .convert import quantize
from .errors import DsqError, DsqWarning
from .formats.spec import MAX_BITS, MIN_BITS

WIDTHS = range(MIN_BITS, MAX_BITS + 1)
# Images measured on (spread over those given) and label draws per image: on 32 ImageNet images,
# 4 draws ranked EfficientNet-Lite0's layers at 3 bits as one forward per layer did, 1 draw less well.
DEFAULT_BUDGET_IMAGES = 256
DEFAULT_SAMPLES = 4
CHUNK = 8  # images per forward: each layer's quantized outputs at every width are held until the backward


@dataclass(frozen=True)
class LayerCost:
    """One quantized layer: at each weight bit width it can take, its bits (weights and scales)
    and its measured cost (nats per image). A layer a name rule pins has one width."""

    name: str
    kind: str
    params: int
    bits: dict[int, int]
    cost: dict[int, float]


@dataclass
class Costs:
    """Every quantized layer's costs, in network order, and how they were measured."""

    layers: list[LayerCost]
    images: int
    samples: int
    seconds: float


def mean_bits(layers: list[LayerCost], bits_of) -> float:
    """Mean bits per weight of the layers, `bits_of(layer)` each."""
    return sum(bits_of(layer) for layer in layers) / sum(layer.params for layer in layers)


def reachable(layers: list[LayerCost]) -> tuple[float, float]:
    """The least and the most mean bits per weight (scales included) the layers can take."""
    return mean_bits(layers, lambda layer: min(layer.bits.values())), mean_bits(
        layers, lambda layer: max(layer.bits.values())
    )


def check_target(layers: list[LayerCost], target: float) -> None:
    """DsqError unless some choice of widths takes at most `target` bits per weight, and not all take less."""
    low, high = reachable(layers)
    if not (isinstance(target, (int, float)) and not isinstance(target, bool) and low <= target <= high):
        raise DsqError(
            f"a target of {target!r} bits per weight is out of reach: this model's quantized layers take "
            f"{low:.3f} (fewest bits) to {high:.3f} (most bits) bits per weight, scales included"
        )


def free_config(config: QuantConfig) -> QuantConfig:
    """`config` without its kind rules that set bits (depthwise at 8 bits): the budget decides those
    layers; rules that name layers by glob and set bits pin them."""
    return replace(config, rules=tuple(r for r in config.rules if r.kind is None or r.bits is None))


def measure_costs(
    model: nn.Module,
    config: QuantConfig,
    images: torch.Tensor,
    *,
    targets: Sequence[float] = (),
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    progress: bool = False,
) -> Costs:
    """Every layer that `config` quantizes, at every width from MIN_BITS to MAX_BITS (one width for a
    layer a name rule pins): its bits and its cost on `images` (N, C, H, W), preprocessed for the model,
    `samples` label draws per image (seeded by `seed`). DsqError before the costs are measured when
    one of `targets` (bits per weight) is out of reach (`check_target`)."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise DsqError(f"samples must be a whole number of at least 1, got {samples!r}")
    started = time.perf_counter()
    free = free_config(config)
    steps = len(WIDTHS) + math.ceil(len(images) / CHUNK)
    with tqdm(total=steps, desc="measuring layer costs", unit="step", disable=not progress) as bar:
        quantized = {}
        for bits in WIDTHS:
            with warnings.catch_warnings():  # the final quantization reports them
                warnings.simplefilter("ignore", DsqWarning)
                quantized[bits] = quantize(model, replace(free, weight=replace(free.weight, bits=bits)))
            bar.update()
        rows, layers = _widths(quantized)
        sizes = [
            LayerCost(name, row.kind, row.params, {bits: total for bits, (total, _) in layers[name].items()}, {})
            for name, row in rows.items()
        ]
        for target in targets:
            check_target(sizes, target)
        sums = _fisher_sums(model, layers, images, samples, seed, bar)
    scale = 1 / (2 * len(images) * samples)
    costs = [replace(layer, cost={bits: s * scale for bits, s in sums[layer.name].items()}) for layer in sizes]
    return Costs(costs, len(images), samples, time.perf_counter() - started)


def _widths(quantized: dict) -> tuple[dict, dict[str, dict[int, tuple[int, nn.Module]]]]:
    """The report row of each quantized layer, and per layer and distinct weight width its total bits
    (weights and scales, exactly as QuantReport counts them) and its quantized module."""
    rows, layers = {}, {}
    for qmodel, report in quantized.values():
        modules = dict(qmodel.named_modules())
        for row in report.quantized_layers:
            rows.setdefault(row.name, row)
            total = round(row.bits_per_weight * row.params)
            layers.setdefault(row.name, {}).setdefault(row.bits, (total, modules[row.name]))
    if not rows:
        raise DsqError("a bit budget needs quantized layers: the config quantizes none of this model's layers")
    return rows, layers


def _fisher_sums(model: nn.Module, layers: dict, images: torch.Tensor, samples: int, seed: int, bar) -> dict:
    """Per layer and width, the sum over images and label draws of (g · d)^2."""
    work = copy.deepcopy(model).eval().requires_grad_(False)
    modules = dict(work.named_modules())
    sums = {name: dict.fromkeys(widths, 0.0) for name, widths in layers.items()}

    def on_forward(name: str):
        def hook(module, inputs, output):
            with torch.no_grad():
                deltas = {bits: layer(inputs[0]) - output for bits, (_, layer) in layers[name].items()}

            def on_backward(grad):
                for bits, delta in deltas.items():
                    sums[name][bits] += (grad * delta).flatten(1).sum(1).square().sum().item()

            output.register_hook(on_backward)

        return hook

    generator = torch.Generator(device=images.device).manual_seed(seed)
    handles = [modules[name].register_forward_hook(on_forward(name)) for name in layers]
    try:
        with torch.enable_grad():
            for start in range(0, len(images), CHUNK):
                logits = work(images[start : start + CHUNK].detach().clone().requires_grad_(True))
                if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                    raise DsqError("a bit budget needs a model whose output is one (N, classes) tensor of logits")
                p = logits.detach().softmax(1)
                for k in range(samples):
                    drawn = torch.multinomial(p, 1, generator=generator)[:, 0]
                    logits.backward(F.one_hot(drawn, p.shape[1]).to(p) - p, retain_graph=k < samples - 1)
                bar.update()
    finally:
        for handle in handles:
            handle.remove()
    return sums
