"""What each weight format costs each layer, measured on images against the float network.

A layer can take every width from 2 to 8 bits, in the config's blocks or in flat blocks COARSE
times as long (one scale per 256 weights at --block 32: 1/16 bit per weight of float16 scales
instead of 1/2), so a budget spends bits on scales only where they pay. A layer's cost in a
format is the KL divergence that its output in that format alone adds to the network's output,
to second order: with g the gradient of log p(y | x) at the layer's output (y drawn from the
float network's own prediction) and d the quantized layer's output minus the float layer's on
the same input, KL ≈ E[(g · d)^2] / 2 (the Fisher information of the output distribution). One
forward and `samples` backward passes per chunk of images measure every layer in every format at
once; the quantized outputs come from the layers `dsq.quantize` makes in each format, so layouts,
BFP inputs and scale dtypes are those of the final model. With `refit` (the calibration will
refit), each of those layers is first fitted to its float inputs' moments, as the calibration's
refit fits it (dsq.calibration.scales.refit_layer): the cost is then the one that calibration
starts from. On ResNet-20 the unfitted costs rank the first stage's small layers as the most
sensitive, yet after calibration they lose nothing at 2 bits (docs/bit-budget.md).
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

from .calibration.capture import route_calls
from .calibration.cost import evaluating, image_cost
from .calibration.inputs import input_moments
from .calibration.plan import BYTES, REFIT_COPIES
from .calibration.scales import refit_layer
from .config import DEFAULT_ACT_MEMORY, QuantConfig
from .convert import quantize
from .errors import DsqError, DsqWarning
from .formats.spec import MAX_BITS, MIN_BITS

WIDTHS = range(MIN_BITS, MAX_BITS + 1)
COARSE = 8  # the coarse format's blocks: COARSE x the config's block, flat
# Images measured on (spread over those given) and label draws per image: on 32 ImageNet images,
# 4 draws ranked EfficientNet-Lite0's layers at 3 bits as one forward per layer did, 1 draw less well.
DEFAULT_BUDGET_IMAGES = 256
DEFAULT_SAMPLES = 4
CHUNK = 8  # images per forward at most: each layer's outputs in every format are held until the backward


@dataclass(frozen=True)
class Choice:
    """A format a layer can take: `bits`-bit weights, in the config's blocks (block and layout
    None) or in `layout` blocks of `block`."""

    bits: int
    block: int | None = None
    layout: str | None = None

    @property
    def value(self) -> int | dict:
        """As a `layer_bits` value (dsq.config.layer_rule): the bits, or the whole format."""
        return self.bits if self.block is None else {"bits": self.bits, "block": self.block, "layout": self.layout}

    def __str__(self) -> str:
        return f"{self.bits} bits" + ("" if self.block is None else f" ({self.layout} {self.block})")

    @property
    def key(self) -> tuple[int, int]:
        return self.bits, self.block or 0


@dataclass(frozen=True)
class LayerCost:
    """One quantized layer: in each format it can take, its bits (weights and scales) and its
    measured cost (nats per image). A layer a name rule pins has one width."""

    name: str
    kind: str
    params: int
    bits: dict[Choice, int]
    cost: dict[Choice, float]


@dataclass
class Costs:
    """Every quantized layer's costs, in network order, and how they were measured."""

    layers: list[LayerCost]
    images: int
    samples: int
    seconds: float
    refit: bool = False


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


def formats(config: QuantConfig) -> list[tuple[Choice, QuantConfig]]:
    """The formats a budget tries, each with the config that quantizes every free layer in it:
    every width, in the config's blocks and in flat blocks COARSE times as long."""
    free, coarse = free_config(config), COARSE * config.weight.block
    found = []
    for bits in WIDTHS:
        found.append((Choice(bits), replace(free.weight, bits=bits)))
        found.append((Choice(bits, coarse, "flat"), replace(free.weight, bits=bits, block=coarse, layout="flat")))
    return [(choice, replace(free, weight=weight)) for choice, weight in found]


def measure_costs(
    model: nn.Module,
    config: QuantConfig,
    images: torch.Tensor,
    *,
    targets: Sequence[float] = (),
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    refit: bool = False,
    progress: bool = False,
) -> Costs:
    """Every layer that `config` quantizes, in every format it can take (`formats`; one width for
    a layer a name rule pins): its bits and its cost on `images` (N, C, H, W), preprocessed for the
    model, `samples` label draws per image (seeded by `seed`), each format's layers first fitted
    to their float inputs with `refit`. DsqError before the costs are measured when one of
    `targets` (bits per weight) is out of reach (`check_target`)."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise DsqError(f"samples must be a whole number of at least 1, got {samples!r}")
    started = time.perf_counter()
    tried, cost = formats(config), image_cost(model, images[:1])
    # images per forward: every layer's outputs in every format held until the backward; the refit's
    # images: a few of the largest activation per image, as the calibration plans its refit
    chunk = max(1, min(CHUNK, DEFAULT_ACT_MEMORY // max(1, BYTES * cost.elements * len(tried))))
    fitted = images[: max(1, DEFAULT_ACT_MEMORY // max(1, BYTES * REFIT_COPIES * cost.largest))]
    steps = len(tried) + refit + math.ceil(len(images) / chunk)
    with tqdm(total=steps, desc="measuring layer costs", unit="step", disable=not progress) as bar:
        quantized = []
        for choice, fmt_config in tried:
            with warnings.catch_warnings():  # the final quantization reports them
                warnings.simplefilter("ignore", DsqWarning)
                quantized.append((choice, *quantize(model, fmt_config)))
            bar.update()
        rows, layers = _layer_formats(quantized)
        sizes = [
            LayerCost(name, row.kind, row.params, {c: total for c, (total, _) in layers[name].items()}, {})
            for name, row in rows.items()
        ]
        for target in targets:
            check_target(sizes, target)
        if refit:
            _fit_to_float_inputs(model, layers, fitted)
            bar.update()
        sums = _fisher_sums(model, layers, images, samples, seed, chunk, bar)
    scale = 1 / (2 * len(images) * samples)
    costs = [replace(layer, cost={c: v * scale for c, v in sums[layer.name].items()}) for layer in sizes]
    return Costs(costs, len(images), samples, time.perf_counter() - started, refit)


def _layer_formats(quantized: list) -> tuple[dict, dict[str, dict[Choice, tuple[int, nn.Module]]]]:
    """The report row of each quantized layer, and per layer and distinct format its total bits
    (weights and scales, exactly as QuantReport counts them) and its quantized module: a layer's
    coarse format only where it holds fewer bits than its own (a 3x3 depthwise kernel already has
    one block per channel), a pinned layer's width only."""
    rows, layers = {}, {}
    for choice, qmodel, report in quantized:
        modules = dict(qmodel.named_modules())
        for row in report.quantized_layers:
            rows.setdefault(row.name, row)
            total = round(row.bits_per_weight * row.params)
            found = layers.setdefault(row.name, {})
            own = replace(choice, bits=row.bits)
            if own not in found and all(total < t for c, (t, _) in found.items() if c.bits == row.bits):
                found[own] = (total, modules[row.name])
    if not rows:
        raise DsqError("a bit budget needs quantized layers: the config quantizes none of this model's layers")
    return rows, layers


def _fit_to_float_inputs(model: nn.Module, layers: dict, images: torch.Tensor) -> None:
    """Every format's module of every layer refitted (VQK and KDS, scales in their dtype) to the
    second moments of the float layer's inputs on `images`, as the calibration's refit fits it."""
    floats = dict(model.named_modules())

    def fit(call):
        second = input_moments(call).second
        for _, layer in layers[call.name].values():
            refit_layer(layer, call.layer.weight, second, call.name)
        return call.run()

    with torch.no_grad(), evaluating(model), route_calls(model, fit, {name: floats[name] for name in layers}):
        model(images)


def _fisher_sums(
    model: nn.Module, layers: dict, images: torch.Tensor, samples: int, seed: int, chunk: int, bar
) -> dict:
    """Per layer and format, the sum over images and label draws of (g · d)^2."""
    work = copy.deepcopy(model).eval().requires_grad_(False)
    modules = dict(work.named_modules())
    sums = {name: dict.fromkeys(choices, 0.0) for name, choices in layers.items()}

    def on_forward(name: str):
        def hook(module, inputs, output):
            with torch.no_grad():
                deltas = {c: layer(inputs[0]) - output for c, (_, layer) in layers[name].items()}

            def on_backward(grad):
                for c, delta in deltas.items():
                    sums[name][c] += (grad * delta).flatten(1).sum(1).square().sum().item()

            output.register_hook(on_backward)

        return hook

    generator = torch.Generator(device=images.device).manual_seed(seed)
    handles = [modules[name].register_forward_hook(on_forward(name)) for name in layers]
    try:
        with torch.enable_grad():
            for start in range(0, len(images), chunk):
                logits = work(images[start : start + chunk].detach().clone().requires_grad_(True))
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
