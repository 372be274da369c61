"""dsq.bit_budget: the exact allocation on synthetic costs, and the measurement on a small model."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dsq
from dsq.bit_budget import allocate, bit_budget
from dsq.bit_budget_measure import WIDTHS, LayerCost, measure_costs
from dsq.config import LayerRule, QuantConfig, quant_config


def synthetic(seed: int, n_layers: int = 4) -> list[LayerCost]:
    """Layers with random sizes, scales and (not convex, not always falling) costs."""
    rng = random.Random(seed)
    layers = []
    for i in range(n_layers):
        params, scales = rng.randint(10, 500), rng.randint(1, 20)
        widths = sorted(rng.sample(list(WIDTHS), rng.randint(1, 4)))
        layers.append(
            LayerCost(
                f"l{i}",
                "conv",
                params,
                {b: b * params + 16 * scales for b in widths},
                {b: rng.random() * 2.0 ** (-b) for b in widths},
            )
        )
    return layers


def brute_force(layers: list[LayerCost], target: float) -> float:
    params = sum(layer.params for layer in layers)
    best = float("inf")
    for choice in itertools.product(*(sorted(layer.bits) for layer in layers)):
        if sum(layer.bits[b] for layer, b in zip(layers, choice)) <= target * params:
            best = min(best, sum(layer.cost[b] for layer, b in zip(layers, choice)))
    return best


def mean_bits(layers, policy) -> float:
    return sum(layer.bits[policy[layer.name]] for layer in layers) / sum(layer.params for layer in layers)


@pytest.mark.parametrize("seed", range(12))
def test_allocation_is_the_brute_force_optimum_within_the_budget(seed):
    layers = synthetic(seed)
    low = mean_bits(layers, {layer.name: min(layer.bits) for layer in layers})
    high = mean_bits(layers, {layer.name: max(layer.bits) for layer in layers})
    previous = float("inf")
    for target in [low, *(low + (high - low) * f for f in (0.1, 0.3, 0.5, 0.8)), high]:
        policy = allocate(layers, target)
        cost = sum(layer.cost[policy[layer.name]] for layer in layers)
        assert mean_bits(layers, policy) <= target
        assert cost == pytest.approx(brute_force(layers, target), rel=1e-9, abs=1e-12)
        assert cost <= previous + 1e-12  # more bits never cost more
        previous = cost


@pytest.mark.parametrize("target", [1.0, 40.0, float("nan")])
def test_unreachable_targets_are_one_line_errors_with_the_range(target, one_line_dsq_error):
    message = one_line_dsq_error(allocate, synthetic(0), target)
    assert "out of reach" in message and "bits per weight" in message


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.pw(F.relu(self.dw(F.relu(self.stem(x))))))
        return self.fc(x.mean((2, 3))) * 3


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(1)
    return Small().eval(), torch.randn(24, 3, 12, 12)


def test_costs_cover_every_quantized_layer_and_width_counted_as_the_report_does(small):
    model, images = small
    costs = measure_costs(model, QuantConfig(), images)
    assert [layer.name for layer in costs.layers] == ["stem", "dw", "pw"]  # fc: linear, kept float
    for bits in WIDTHS:
        _, report = dsq.quantize(model, quant_config(bits=bits, depthwise_bits=bits))
        for layer, row in zip(costs.layers, report.quantized_layers):
            assert layer.bits[bits] == pytest.approx(row.bits_per_weight * row.params, abs=1e-6)
    for layer in costs.layers:
        assert sorted(layer.cost) == list(WIDTHS) and all(c >= 0 for c in layer.cost.values())
        assert layer.cost[2] > layer.cost[8]


def test_a_name_rule_pins_its_layer(small):
    model, images = small
    config = QuantConfig(rules=(LayerRule(name="dw", bits=6), *QuantConfig().rules))
    costs = measure_costs(model, config, images, samples=1)
    assert {layer.name: sorted(layer.bits) for layer in costs.layers}["dw"] == [6]


@torch.no_grad()
def direct_kl(model, qlayer_of, images) -> float:
    """KL(float || network with only one layer's output replaced by its quantized layer's)."""
    reference = F.log_softmax(model(images), 1)
    name, qlayer = qlayer_of
    handle = dict(model.named_modules())[name].register_forward_hook(lambda m, args, out: qlayer(args[0]))
    try:
        perturbed = F.log_softmax(model(images), 1)
    finally:
        handle.remove()
    return float((reference.exp() * (reference - perturbed)).sum(1).mean())


def test_measured_cost_is_the_kl_that_the_layer_adds(small):
    """The second-order estimate against the KL measured by running the network with that layer quantized."""
    model, images = small
    costs = {layer.name: layer for layer in measure_costs(model, QuantConfig(), images, samples=32).layers}
    for bits in (2, 3):
        qmodel, _ = dsq.quantize(model, quant_config(bits=bits, depthwise_bits=bits))
        layers = dict(qmodel.named_modules())
        for name in ("stem", "dw", "pw"):
            kl = direct_kl(model, (name, layers[name]), images)
            assert 0.5 * kl <= costs[name].cost[bits] <= 2 * kl, (name, bits, kl, costs[name].cost[bits])


def test_the_budget_config_quantizes_at_most_the_target_and_replays(small):
    model, images = small
    budget = bit_budget(model, QuantConfig(), images, 7.0)
    _, report = dsq.quantize(model, budget.config)
    assert report.mean_bits_per_weight <= 7.0
    assert report.mean_bits_per_weight == pytest.approx(budget.mean_bits)
    assert {r.name: r.bits for r in report.quantized_layers} == budget.policy
    _, replayed = dsq.quantize(model, quant_config(layer_bits=budget.layer_bits()))
    assert {r.name: r.bits for r in replayed.quantized_layers} == budget.policy
    assert [row["layer"] for row in budget.rows()] == ["stem", "dw", "pw"]


def test_an_unreachable_target_fails_before_measuring(small, one_line_dsq_error):
    model, images = small
    message = one_line_dsq_error(measure_costs, model, QuantConfig(), images[:0], targets=[1.5])
    assert "out of reach" in message
