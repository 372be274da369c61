"""A bit budget: each quantized layer's weight format (bits 2 to 8, in the config's blocks or in
coarser flat ones) chosen so that the mean bits per weight, scales included, is at most a target
and the summed measured cost is least.

    budget = bit_budget(model, QuantConfig(), images, target=4.6)  # measures, then allocates
    qmodel, report = dsq.quantize(model, budget.config)           # report.mean_bits_per_weight <= 4.6
    budget.layer_bits()  # {exact glob: bits or format}, what quant_config(layer_bits=...) takes

The costs come from `dsq.bit_budget_measure`. The allocation is a multiple-choice knapsack,
solved exactly as an integer program (scipy's HiGHS): one format per layer, the layers' bits
summed at most target x weights; exact rather than greedy on the convex hull of each cost
curve, since measured curves are not convex and a greedy fill leaves up to one large layer's
step of the budget unspent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import nn

from .bit_budget_measure import (
    DEFAULT_BUDGET_IMAGES,
    DEFAULT_SAMPLES,
    Choice,
    Costs,
    LayerCost,
    check_target,
    free_config,
    mean_bits,
    measure_costs,
)
from .calibration import load_images
from .config import LayerRule, QuantConfig
from .errors import DsqError
from .evaluate import spread_indices
from .sensitivity import exact_glob


def allocate(layers: list[LayerCost], target: float) -> dict[str, Choice]:
    """{layer name: format} of least summed cost whose mean bits per weight (scales included) is
    at most `target`; DsqError when no choice of formats reaches it (`check_target`)."""
    check_target(layers, target)
    options = [(layer, choice) for layer in layers for choice in layer.bits]
    cost = np.array([layer.cost[choice] for layer, choice in options])
    size = np.array([layer.bits[choice] for layer, choice in options], dtype=float)
    one_each = np.zeros((len(layers), len(options)))
    column = 0
    for row, layer in enumerate(layers):
        one_each[row, column : column + len(layer.bits)] = 1
        column += len(layer.bits)
    budget = math.floor(target * sum(layer.params for layer in layers))
    result = milp(
        cost / max(cost.max(), 1e-30),  # scaled to 1: the solver's tolerances are absolute
        integrality=np.ones(len(options)),
        bounds=Bounds(0, 1),
        constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(size[None], -np.inf, budget)],
        options={"mip_rel_gap": 0},
    )
    if result.x is None:
        raise DsqError(f"the bit allocation found no solution ({result.message}): try another --target-bits")
    return {layer.name: choice for (layer, choice), x in zip(options, result.x) if x > 0.5}


@dataclass
class BitBudget:
    """The formats chosen for a target (`policy`: layer name -> Choice), from the measured
    `costs`, and the config that quantizes with them (`config`)."""

    target: float
    base: QuantConfig
    costs: Costs
    policy: dict[str, Choice]

    @property
    def config(self) -> QuantConfig:
        """`base` with one exact-name rule per quantized layer first (its kind rules that set bits
        dropped: the policy decides those layers)."""
        rules = tuple(
            LayerRule(name=exact_glob(name), bits=c.bits, block=c.block, layout=c.layout)
            for name, c in self.policy.items()
        )
        free = free_config(self.base)
        return replace(free, rules=rules + free.rules)

    def layer_bits(self) -> dict[str, int | dict]:
        """The policy as {glob: bits or format}, what `--layer-bits FILE` and quant_config(layer_bits=...) take."""
        return {exact_glob(name): c.value for name, c in self.policy.items()}

    @property
    def mean_bits(self) -> float:
        return mean_bits(self.costs.layers, lambda layer: layer.bits[self.policy[layer.name]])

    @property
    def cost(self) -> float:
        return sum(layer.cost[self.policy[layer.name]] for layer in self.costs.layers)

    def rows(self) -> list[dict]:
        """One row per quantized layer, in network order: its chosen format, bits per weight and cost."""
        return [
            {
                "layer": layer.name,
                "kind": layer.kind,
                "params": layer.params,
                "bits": self.policy[layer.name].bits,
                "block": self.policy[layer.name].block or self.base.weight.block,
                "layout": self.policy[layer.name].layout or self.base.weight.layout,
                "bits_per_weight": round(layer.bits[self.policy[layer.name]] / layer.params, 4),
                "cost": layer.cost[self.policy[layer.name]],
                "costs": {str(c): cost for c, cost in sorted(layer.cost.items(), key=lambda item: item[0].key)},
            }
            for layer in self.costs.layers
        ]

    def to_dict(self) -> dict:
        return {
            "target_bits": self.target,
            "mean_bits_per_weight": self.mean_bits,
            "cost": self.cost,
            "images": self.costs.images,
            "samples": self.costs.samples,
            "measure_seconds": self.costs.seconds,
            "layer_bits": self.layer_bits(),
            "layers": self.rows(),
        }


def plan(costs: Costs, config: QuantConfig, target: float) -> BitBudget:
    """The BitBudget of `target` bits per weight over measured `costs` (of `config`)."""
    return BitBudget(target, config, costs, allocate(costs.layers, target))


def bit_budget(
    model: nn.Module,
    config: QuantConfig,
    images: torch.Tensor,
    target: float,
    *,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    refit: bool = False,
    progress: bool = False,
) -> BitBudget:
    """Measure every layer's cost in every format on `images` (`measure_costs`; `refit`: as the
    calibration's refit will start them), then choose the formats of least summed cost at most
    `target` bits per weight, scales included."""
    costs = measure_costs(
        model, config, images, targets=(target,), samples=samples, seed=seed, refit=refit, progress=progress
    )
    return plan(costs, config, target)


def budget_images(calibration: torch.Tensor | None, dataset=None, count: int = DEFAULT_BUDGET_IMAGES) -> torch.Tensor:
    """The images a budget is measured on: `count` spread over the calibration images, else over the
    images of `dataset` (a dsq.data.LabelledImages; labels unused); DsqError with neither."""
    if calibration is not None:
        return calibration[spread_indices(len(calibration), count)]
    if dataset is None or len(dataset) == 0:
        raise DsqError("a bit budget measures each layer's cost on images: give calibration images (--calib) or --data")
    return load_images([dataset.samples[i][0] for i in spread_indices(len(dataset), count)], dataset.transform)
