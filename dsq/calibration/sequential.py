"""Layer by layer, in execution order, on the quantized network's own inputs: refit each
layer's VQK and KDS to its calibration inputs, then remove the systematic shift of its output."""

from __future__ import annotations

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .capture import Call, route_calls
from .inputs import InputMoments, input_moments, output_means
from .scales import refit_layer


def ensure_bias(layer: nn.Module) -> torch.Tensor:
    """The layer's bias, created as zeros when it has none (the correction needs one)."""
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(layer.vqk.shape[0], device=layer.vqk.device))
    return layer.bias


def correct_bias(layer: nn.Module, moments: InputMoments, float_mean: torch.Tensor) -> None:
    """Shift the layer's bias so that its mean output over the calibration inputs equals the
    float network's (the mean output is linear: w_hat . E[x] + b)."""
    groups = moments.total.shape[0]
    w = layer.weight.detach().double().reshape(groups, layer.vqk.shape[0] // groups, -1)
    mean = (w @ moments.mean[:, :, None]).flatten()
    bias = ensure_bias(layer)
    with torch.no_grad():
        bias += (float_mean - mean - bias.double()).to(bias.dtype)


def refit_layers(
    float_model: nn.Module,
    qmodel: nn.Module,
    layers: dict[str, nn.Module],
    images: torch.Tensor,
    *,
    fit_scales: bool = True,
    bias: bool = True,
    progress: bool = False,
) -> list[str]:
    """Refit every layer of `layers` (name -> DSConv module of `qmodel`) in the order they run,
    on `images`, and return that order. One pass of the quantized network over all of them at
    once: each layer is refitted when the pass reaches it, so the layers after it see its new
    output. `float_model` has a float layer under each name; refitted scales are rounded to each
    layer's scale dtype."""
    float_layers = dict(float_model.named_modules())
    targets, order = output_means(float_model, {n: float_layers[n] for n in layers}, images)
    desc = "refitting layers" if fit_scales else "correcting biases"
    bar = tqdm(total=len(order), desc=desc, unit="layer", disable=not progress)

    def refit(call: Call) -> torch.Tensor:
        layer, moments = call.layer, input_moments(call)
        if fit_scales:
            refit_layer(layer, float_layers[call.name].weight, moments.second, call.name)
        if bias:
            correct_bias(layer, moments, targets[call.name])
        bar.update()
        return call.run()

    with torch.no_grad(), route_calls(qmodel, refit, layers):
        qmodel(images)
    bar.close()
    return order
