"""Re-estimate BatchNorm statistics on the quantized network's own activations."""

from __future__ import annotations

import torch
import torch.nn as nn
from tqdm.auto import tqdm


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, images: torch.Tensor, chunk: int = 128, *, progress: bool = False) -> int:
    """Recompute every BatchNorm's running mean and variance as the average over `images`
    (in chunks) of what the quantized layers feed it; return how many BatchNorms changed."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over all chunks
        m.train()
    try:
        for start in tqdm(
            range(0, len(images), chunk), desc="BatchNorm statistics", unit="batch", disable=not progress
        ):
            model(images[start : start + chunk])
    finally:
        for m, (momentum, training) in zip(norms, saved):
            m.momentum = momentum
            m.train(training)
    return len(norms)
