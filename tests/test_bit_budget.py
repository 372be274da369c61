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
from dsq.bit_budget_measure import WIDTHS, Choice, LayerCost, formats, measure_costs
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


def test_costs_cover_every_quantized_layer_and_format_counted_as_the_report_does(small):
    """Every width in the config's blocks; in flat blocks of 256 where that holds fewer bits: the
    stem (27 weights per output channel: 9 blocks of 3 at block 32, one of 27 flat), not the
    depthwise conv (one block of 9 either way) nor the pointwise one (one block of 16)."""
    model, images = small
    costs = measure_costs(model, QuantConfig(), images)
    assert [layer.name for layer in costs.layers] == ["stem", "dw", "pw"]  # fc: linear, kept float
    coarse = {layer.name: sorted(c.bits for c in layer.bits if c.block) for layer in costs.layers}
    assert coarse == {"stem": list(WIDTHS), "dw": [], "pw": []}
    for choice, config in formats(QuantConfig()):
        _, report = dsq.quantize(model, config)
        for layer, row in zip(costs.layers, report.quantized_layers):
            if choice in layer.bits:
                assert layer.bits[choice] == pytest.approx(row.bits_per_weight * row.params, abs=1e-6)
                assert (row.block, row.layout) == ((choice.block, "flat") if choice.block else (32, row.layout))
    for layer in costs.layers:
        assert sorted(c.bits for c in layer.cost if not c.block) == list(WIDTHS)
        assert all(c >= 0 for c in layer.cost.values()) and layer.cost[Choice(2)] > layer.cost[Choice(8)]


def test_refitted_costs_are_lower_and_leave_the_model_as_it_was(small):
    """Each format's layers fitted to their float inputs first, as calibration's refit starts them."""
    model, images = small
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = measure_costs(model, QuantConfig(), images, samples=8)
    fitted = measure_costs(model, QuantConfig(), images, samples=8, refit=True)
    assert fitted.refit and not plain.refit
    for choice in (Choice(2), Choice(3)):
        assert sum(layer.cost[choice] for layer in fitted.layers) < sum(layer.cost[choice] for layer in plain.layers)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_name_rule_pins_its_layer(small):
    model, images = small
    config = QuantConfig(rules=(LayerRule(name="dw", bits=6), *QuantConfig().rules))
    costs = measure_costs(model, config, images, samples=1)
    assert {layer.name: sorted(c.bits for c in layer.bits) for layer in costs.layers}["dw"] == [6]


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
            cost = costs[name].cost[Choice(bits)]
            assert 0.5 * kl <= cost <= 2 * kl, (name, bits, kl, cost)


@pytest.mark.parametrize("target", [7.0, 3.0])
def test_the_budget_config_quantizes_at_most_the_target_and_replays(small, target):
    model, images = small
    budget = bit_budget(model, QuantConfig(), images, target)
    formats = {name: (c.bits, c.block or 32) for name, c in budget.policy.items()}
    _, report = dsq.quantize(model, budget.config)
    assert report.mean_bits_per_weight <= target
    assert report.mean_bits_per_weight == pytest.approx(budget.mean_bits)
    assert {r.name: (r.bits, r.block) for r in report.quantized_layers} == formats
    _, replayed = dsq.quantize(model, quant_config(layer_bits=budget.layer_bits()))
    assert {r.name: (r.bits, r.block) for r in replayed.quantized_layers} == formats
    assert [(row["layer"], row["bits"], row["block"]) for row in budget.rows()] == [(n, *f) for n, f in formats.items()]


def test_a_target_below_the_configs_blocks_takes_coarse_ones(small):
    """At block 32 the stem's 2-bit weights hold 2 + 16/3 bits each (scales of 3 channels), and the
    layers at least 4.82 bits per weight: 3.5 is reachable only with the stem in flat blocks of 256."""
    model, images = small
    budget = bit_budget(model, QuantConfig(), images, 3.5)
    assert budget.policy["stem"].block == 256 and budget.mean_bits <= 3.5


def test_an_unreachable_target_fails_before_measuring(small, one_line_dsq_error):
    model, images = small
    message = one_line_dsq_error(measure_costs, model, QuantConfig(), images[:0], targets=[1.5])
    assert "out of reach" in message


def test_a_model_in_mixed_formats_saves_reloads_and_runs_on_integers(tmp_path):
    """Layers in a budget's coarse format (flat blocks of 256) beside channel blocks of 32: the .dsq
    file reloads bit-identically, and the int backend equals the exact one."""
    from dsq.nn import set_backend

    from zoo import build, example_input

    coarse = {"bits": 2, "block": 256, "layout": "flat"}
    config = quant_config(bits=3, layer_bits={"layer3.*": coarse, "layer1.0.conv1": {**coarse, "bits": 5}})
    qmodel, report = dsq.quantize(build("cifar_resnet20"), config)
    formats = {r.name: (r.bits, r.block, r.layout) for r in report.quantized_layers}
    assert formats["layer3.1.conv2"] == (2, 256, "flat") and formats["layer2.0.conv1"] == (3, 32, "channel")
    dsq.save(tmp_path / "mixed.dsq", qmodel, report, arch="cifar_resnet20", num_classes=10)
    loaded, _ = dsq.load(tmp_path / "mixed.dsq")
    x = example_input("cifar_resnet20")
    with torch.inference_mode():
        assert torch.equal(loaded(x), qmodel(x))
        set_backend(qmodel, "exact")
        exact = qmodel(x)
        set_backend(qmodel, "int")
        assert torch.equal(qmodel(x), exact)
