"""The calibration plan: counted from the model, deterministic, bounded in work and memory,
overridden by explicit settings, stated in one line and in the report; a bar per stage."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import dsq
from dsq.calibration import plan as plan_module
from dsq.calibration.cost import ELEMENT_MACS, image_cost
from dsq.calibration.plan import MIN_BUDGET_STEPS, STEP_PASSES, plan_calibration
from dsq.config import DEFAULT_ADAPT_WORK, DEFAULT_BATCH, DEFAULT_STEPS, CalibConfig


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    ).eval()


def images(n: int, side: int) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(0))


def test_the_count_is_exact_on_a_conv():
    cost = image_cost(nn.Conv2d(3, 8, 3), torch.randn(1, 3, 10, 10))
    assert cost.macs == 8 * 8 * 8 * 27  # output values times the 3x3x3 weights each
    assert cost.largest == cost.elements == 8 * 8 * 8  # one operator, its output
    assert cost.work == cost.macs + ELEMENT_MACS * cost.elements


def test_a_bigger_input_gets_fewer_steps_never_more_than_the_cap_and_the_same_every_time():
    model = small_net()
    small = plan_calibration(model, images(64, 32), CalibConfig())
    assert (small.adapt_steps, small.batch_size, small.budget) == (DEFAULT_STEPS, DEFAULT_BATCH, DEFAULT_ADAPT_WORK)
    big_images = images(64, 320)
    big = plan_calibration(model, big_images, CalibConfig())
    assert MIN_BUDGET_STEPS <= big.adapt_steps < DEFAULT_STEPS
    assert big.adapt_steps == DEFAULT_ADAPT_WORK // (STEP_PASSES * big.batch_size * big.cost.work)
    assert big.cost.work > 90 * small.cost.work  # 100x the pixels
    again = plan_calibration(model, big_images, CalibConfig())
    assert (again.adapt_steps, again.cost) == (big.adapt_steps, big.cost)  # counted, not timed
    assert big.seconds > 0 and big.probe_images <= big.fit_images == 64
    huge = plan_calibration(model, images(16, 1024), CalibConfig())
    assert huge.adapt_steps == 0 and huge.budget == DEFAULT_ADAPT_WORK  # fewer than MIN_BUDGET_STEPS fit


def test_explicit_settings_override_the_plan():
    model, x = small_net(), images(64, 320)
    given = plan_calibration(model, x, CalibConfig(adapt_steps=7, batch_size=5, fit_images=9))
    assert (given.adapt_steps, given.batch_size, given.fit_images, given.budget) == (7, 5, 9, None)
    timed = plan_calibration(model, x, CalibConfig(adapt_seconds=30.0))
    assert timed.adapt_steps == DEFAULT_STEPS and timed.budget is None  # the time limit decides
    assert plan_calibration(model, x, CalibConfig(adapt_steps=0)).adapt_steps == 0


def test_large_activations_shrink_the_batch_and_the_refit_images(monkeypatch):
    model, x = small_net(), images(64, 64)
    roomy = plan_calibration(model, x, CalibConfig())
    monkeypatch.setattr(plan_module, "DEFAULT_ACT_MEMORY", 20 * roomy.cost.largest * 4)
    tight = plan_calibration(model, x, CalibConfig())
    assert roomy.batch_size == roomy.fit_images == 64
    assert tight.fit_images == 4  # 20 largest activations: 5 images of 4 copies, rounded down to a power of 2
    assert tight.batch_size * tight.cost.elements * 4 <= 20 * roomy.cost.largest * 4 and tight.batch_size >= 1


def test_progress_states_the_plan_and_shows_a_bar_per_stage(capsys):
    model = small_net()
    qmodel, report = dsq.quantize(model, bits=4)
    capsys.readouterr()
    dsq.calibrate(model, qmodel, report, images(16, 16), act_search=True, batchnorm=True, adapt_steps=2, progress=True)
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert first.startswith("calibration: act search, refit on 16 images, BatchNorm on 16, 2 distillation steps")
    assert "about" in first
    for bar in ("output SQNR before", "activation search", "refitting layers", "BatchNorm statistics", "adapting"):
        assert bar in err, bar
    assert "output SQNR after" in err
    qmodel, report = dsq.quantize(model, bits=4)
    capsys.readouterr()
    dsq.calibrate(model, qmodel, report, images(16, 16), adapt_steps=2)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("steps", [None, 3])
def test_the_report_records_the_plan(steps, monkeypatch):
    model = small_net()
    qmodel, report = dsq.quantize(model, bits=4)
    work = image_cost(model, images(1, 16)).work
    budget = MIN_BUDGET_STEPS * STEP_PASSES * 8 * work  # the fewest steps of 8 that it distils
    monkeypatch.setattr(plan_module, "DEFAULT_ADAPT_WORK", budget)
    result = dsq.calibrate(model, qmodel, report, images(16, 16), adapt_steps=steps, batch_size=8)
    recorded = json.loads(json.dumps(report.calibration))["plan"]
    assert recorded == json.loads(json.dumps(result.plan))
    assert recorded["adapt_steps"] == result.adapt.steps == (steps or MIN_BUDGET_STEPS)
    assert recorded["budget"] == (None if steps else budget)
    assert recorded["batch_size"] == 8 and recorded["cost"]["macs"] > 0 and recorded["seconds"] > 0
