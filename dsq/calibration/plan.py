"""The calibration plan: images per stage, distillation steps and batch, sized from what one image
costs the float model (dsq.calibration.cost), so that the defaults spend a bounded work and
memory scaled to the model, the same on every machine; and an estimate of the time it takes here."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from ..config import (
    DEFAULT_ACT_MEMORY,
    DEFAULT_ADAPT_WORK,
    DEFAULT_BATCH,
    DEFAULT_FIT_IMAGES,
    DEFAULT_STEPS,
    CalibConfig,
)
from .cost import ImageCost, evaluating, image_cost

BYTES = 4  # float32 activations
STEP_PASSES = 4  # a distillation step per image: teacher forward, student forward, backward (2 forwards)
REFIT_COPIES = 4  # the refit holds about this many of the largest activation per image at once
PROBE_WORK = 2**37  # the output-SQNR probe: images whose forward passes cost at most this (all of R20's 512)
PROBE_LEAST = 8
# Fewer distillation steps than this perturb more than they teach: on EfficientNet-Lite0 after the
# refit, 3 and 17 steps of 32 raised the distillation loss from 0.044 to 0.76 and 0.55 (100 steps of
# 16 helped: docs/calibration.md). Where the budget allows fewer, the plan distils not at all.
MIN_BUDGET_STEPS = 50
# Forward passes per image that each stage costs, for the time estimate (measured on
# EfficientNet-Lite0, 100 images, 2 cores: docs/calibration.md; the refit's include its per-layer fits).
PASSES = {"sqnr": 3.0, "act_search": 6.0, "refit": 9.0, "bias": 3.0, "batchnorm": 1.0, "adapt": 5.0}
SPEED_IMAGES = 4  # images of the timed forward pass that sets the estimate


@dataclass(frozen=True)
class CalibPlan:
    """What `dsq.calibrate` will do: images of the refit (and bias) and of the SQNR probe,
    distillation steps and batch, the work budget that set the steps (None when given), one
    image's cost, the seconds of one image's forward pass here and the estimated seconds."""

    images: int
    fit_images: int
    probe_images: int
    adapt_steps: int
    batch_size: int
    budget: int | None
    cost: ImageCost
    pass_seconds: float
    seconds: float

    def describe(self, config: CalibConfig) -> str:
        """One line: the stages, their images, the steps and the estimate."""
        stages = ["act search" if config.act_search else None]
        if config.refit or config.bias:
            stages.append(f"{'refit' if config.refit else 'bias correction'} on {self.fit_images} images")
        stages.append(f"BatchNorm on {self.images}" if config.batchnorm else None)
        why = "as asked"
        if self.budget:
            why = f"budget {self.budget / 1e12:g} T MAC-equivalents at {self.cost.work / 1e9:.2f} G per image-pass"
            why += "" if self.adapt_steps else f" allows fewer than {MIN_BUDGET_STEPS} steps of {self.batch_size}"
        limit = f", at most {config.adapt_seconds:g} s" if config.adapt_seconds else ""
        steps = (
            f"{self.adapt_steps} distillation steps of {self.batch_size} images"
            if self.adapt_steps
            else "no distillation"
        )
        stages.append(f"{steps} ({why}{limit})")
        stages.append(f"output SQNR before/after on {self.probe_images}")
        return f"calibration: {', '.join(s for s in stages if s)}; about {_minutes(self.seconds)} here"

    def to_dict(self) -> dict:
        return {**asdict(self), "cost": self.cost.to_dict()}


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _within(memory: int, per_image: int, most: int) -> int:
    """The largest power of two of images, at most `most`, whose `per_image` bytes fit `memory`
    (at least 1)."""
    fits = max(1, memory // max(1, per_image))
    return min(most, 1 << (fits.bit_length() - 1))


def plan_calibration(float_model: nn.Module, images: torch.Tensor, config: CalibConfig) -> CalibPlan:
    """The plan for calibrating on `images` as `config` says; its settings left at None are
    sized here: the batch and the refit's images to DEFAULT_ACT_MEMORY, the distillation steps to
    DEFAULT_ADAPT_WORK (at most DEFAULT_STEPS, none where fewer than MIN_BUDGET_STEPS fit)."""
    n = len(images)
    cost = image_cost(float_model, images[:1])
    batch = min(n, config.batch_size or _within(DEFAULT_ACT_MEMORY, BYTES * cost.elements, DEFAULT_BATCH))
    fit = min(
        n, config.fit_images or _within(DEFAULT_ACT_MEMORY, BYTES * REFIT_COPIES * cost.largest, DEFAULT_FIT_IMAGES)
    )
    probe = min(fit, max(PROBE_LEAST, PROBE_WORK // cost.work))
    budget = None
    if config.adapt_steps is not None:
        steps = config.adapt_steps
    elif config.adapt_seconds is not None:
        steps = DEFAULT_STEPS
    else:
        budget = DEFAULT_ADAPT_WORK
        steps = min(DEFAULT_STEPS, budget // (STEP_PASSES * batch * cost.work))
        steps = steps if steps >= MIN_BUDGET_STEPS else 0
    passes = PASSES["sqnr"] * 2 * probe + PASSES["adapt"] * steps * batch
    passes += PASSES["act_search"] * fit if config.act_search else 0
    passes += PASSES["refit"] * fit if config.refit else PASSES["bias"] * fit if config.bias else 0
    passes += PASSES["batchnorm"] * n if config.batchnorm else 0
    speed = _seconds_per_pass(float_model, images)
    return CalibPlan(n, fit, probe, steps, batch, budget, cost, speed, passes * speed)


def _seconds_per_pass(model: nn.Module, images: torch.Tensor) -> float:
    """Seconds of one image's float forward pass on this machine: the second of two passes over a
    few images (the first sets the kernels up for their shapes)."""
    x = images[:SPEED_IMAGES]
    with evaluating(model):
        model(x)
        started = time.perf_counter()
        model(x)
    return (time.perf_counter() - started) / len(x)
