"""Distillation adaptation (docs/method.md §6): the float network teaches the quantized one on
unlabelled images; only the float parts learn (KDS, biases, BatchNorm's affine), and, with
weights="ste", the integers through a straight-through latent weight, or with weights="learned"
each weight's rounding down or up (AdaRound)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import DEFAULT_BATCH, DEFAULT_LR, DEFAULT_STEPS
from ..nn import freeze, make_trainable, parameter_groups
from ..nn.train import rounding_penalty

FLOAT_PARTS_LR = 10.0
ROUNDING_LR = 1e-2  # the learned roundings V are sigmoid inputs (order 1), not weights: their own rate
DEFAULT_ROUNDING_WEIGHT = 0.01  # lambda: the rounding penalty (at most 1) against the distillation loss


@dataclass
class AdaptResult:
    """What the adaptation did: steps run, distillation loss at the start and the end, seconds."""

    steps: int
    first_loss: float
    last_loss: float
    seconds: float


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 1/8 of the side (reflected borders)."""
    flip = torch.rand(len(x), generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    pad = max(1, x.shape[-1] // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return padded[:, :, dy : dy + x.shape[-2], dx : dx + x.shape[-1]]


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the class distributions, batch mean."""
    return F.kl_div(F.log_softmax(student, 1), F.log_softmax(teacher, 1), log_target=True, reduction="batchmean")


def adapt(
    float_model: nn.Module,
    qmodel: nn.Module,
    images: torch.Tensor,
    *,
    steps: int = DEFAULT_STEPS,
    seconds: float | None = None,
    batch_size: int = DEFAULT_BATCH,
    lr: float = DEFAULT_LR,
    weights: str = "fixed",
    rounding_weight: float = DEFAULT_ROUNDING_WEIGHT,
    seed: int = 0,
    progress: bool = False,
) -> AdaptResult:
    """Train `qmodel` to match `float_model`'s outputs on `images` for `steps` steps of `batch_size`
    images (at most as many as there are) drawn with replacement (or until
    `seconds` have passed), seeded; BatchNorm keeps its statistics (eval mode). Leaves `qmodel`
    frozen (an inference model again) with its scales in each layer's scale dtype.

    weights="learned" adds `rounding_weight` times the rounding penalty (dsq.nn.train.rounding_penalty,
    its exponent annealed over `steps`) to the loss; the losses reported are the distillation's."""
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    float_model.eval(), qmodel.eval()
    make_trainable(qmodel, weights, reference=float_model)
    groups = parameter_groups(qmodel)
    optimizer = torch.optim.Adam(
        [
            {"params": groups["latent"] + groups["kds"], "lr": lr},
            {"params": groups["rounding"], "lr": ROUNDING_LR},
            {"params": groups["other"], "lr": lr * FLOAT_PARTS_LR},
        ]
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses, bar = [], tqdm(total=steps, desc="adapting", unit="step", disable=not progress)
    for step in range(steps):
        batch = augment(
            images[torch.randint(len(images), (min(batch_size, len(images)),), generator=generator)], generator
        )
        with torch.no_grad():
            teacher = float_model(batch)
        loss = distillation_loss(qmodel(batch), teacher)
        total = loss + rounding_weight * rounding_penalty(qmodel, step / steps) if weights == "learned" else loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.update(), bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if seconds is not None and time.perf_counter() - started > seconds:
            break
    bar.close()
    freeze(qmodel)
    tail = losses[-max(1, len(losses) // 10) :]
    return AdaptResult(len(losses), losses[0], sum(tail) / len(tail), time.perf_counter() - started)
