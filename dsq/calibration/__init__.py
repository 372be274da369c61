"""What uses unlabelled data: data-aware scales, bias and BatchNorm correction, distillation.

    qmodel, report = dsq.quantize(model, bits=2)
    images = load_images(calibration_files("calib/"), preset.transform())
    calibration = dsq.calibrate(model, qmodel, report, images)

First a plan (`plan_calibration`): what one image costs the model sizes the images of each stage and the
distillation's steps and batch. Stages, in order (each optional, see `calibrate`): choose each
layer's activation mantissa bits and block within its bits per activation (`act_search`); refit
every layer's VQK and KDS to its inputs, layer by layer (`sequential`); correct each layer's
output mean (bias); re-estimate BatchNorm statistics; distillation from the float network
(`adapt`). The report gains the plan, each layer's output SQNR before and after, the images used
and the time of every stage.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn

from ..config import DEFAULT_ACT_MEMORY, DEFAULT_ADAPT_WORK, DEFAULT_FIT_IMAGES, DEFAULT_STEPS, CalibConfig
from ..errors import DsqError
from ..evaluate import spread_indices
from ..finite import all_finite
from ..nn import is_dsconv
from ..quant_report import IMAGE_INPUT_ACT, QuantReport, layer_row
from .act_search import search_act_formats
from .adapt import AdaptResult, adapt
from .batchnorm import reestimate_batchnorm
from .cost import evaluating
from .images import DEFAULT_CALIB_IMAGES, calibration_files, calibration_set, load_images
from .plan import CalibPlan, plan_calibration
from .sequential import refit_layers
from .sqnr import output_sqnr

__all__ = [
    "CalibPlan",
    "CalibrationReport",
    "DEFAULT_ACT_MEMORY",
    "DEFAULT_ADAPT_WORK",
    "DEFAULT_CALIB_IMAGES",
    "DEFAULT_FIT_IMAGES",
    "DEFAULT_STEPS",
    "calibrate",
    "calibration_files",
    "calibration_set",
    "load_images",
]


@dataclass
class CalibrationReport:
    """What calibration did: images used (all of them by distillation and BatchNorm, `fit_images`
    of them by the act search, refit and bias stages, `plan["probe_images"]` of those by the SQNR),
    seconds per stage, per-layer output SQNR (dB) before and after, the distillation's losses,
    and the plan (CalibPlan.to_dict: images, steps, batch, budget, estimated seconds)."""

    images: int
    fit_images: int
    source: str | None
    stages: dict[str, float] = field(default_factory=dict)  # stage -> seconds, in the order run
    sqnr_before: dict[str, float] = field(default_factory=dict)
    sqnr_after: dict[str, float] = field(default_factory=dict)
    adapt: AdaptResult | None = None
    plan: dict | None = None

    @property
    def seconds(self) -> float:
        return sum(self.stages.values())

    def to_dict(self) -> dict:
        return {**asdict(self), "seconds": self.seconds}


def calibrate(
    float_model: nn.Module,
    qmodel: nn.Module,
    report: QuantReport,
    images: torch.Tensor,
    config: CalibConfig | None = None,
    *,
    source: str | None = None,
    progress: bool = False,
    **options,
) -> CalibrationReport:
    """Improve `qmodel` (from dsq.quantize(float_model)) in place with unlabelled images.

    Args:
        float_model: the float model `qmodel` was quantized from.
        qmodel, report: what dsq.quantize returned; the report's rows are derived again from
            the calibrated layers.
        images: a float tensor (N, C, H, W), preprocessed as for the model.
        config: the stages (dsq.config.CalibConfig), or leave it out and pass its fields as
            keywords, e.g. `adapt_steps=0`. act_search: give each layer with a BFP input the
            mantissa bits and block size, at no more bits per activation than it has, that keep
            its output closest to its output on the unrounded input (docs/activation-search.md);
            runs before the refit. refit: data-aware VQK and KDS (minimising each layer's output
            error on `fit_images` of the images). bias: match each layer's mean output to the float
            network's. batchnorm: re-estimate BatchNorm statistics. adapt_steps > 0: distillation
            from `float_model` (`adapt_weights` "fixed" keeps the integers, "ste" re-derives them,
            "learned" learns each weight's rounding, AdaRound-style), stopped after `adapt_seconds`
            if given. Seeded by `seed`. Left at None, `adapt_steps`, `batch_size` and `fit_images`
            are sized to the model (dsq.calibration.plan: bounded work and memory).
        source: where the images came from, for the report.
        progress: print the plan (one line on stderr) and show a progress bar per stage.

    Returns:
        The CalibrationReport: the plan, images used, seconds per stage, per-layer output SQNR
        before and after.

    Example:
        >>> import torch, torch.nn as nn, dsq
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1))
        >>> qmodel, report = dsq.quantize(model, bits=4)
        >>> result = dsq.calibrate(model, qmodel, report, torch.randn(16, 3, 8, 8), adapt_steps=0)
        >>> list(result.stages)
        ['plan', 'sqnr_before', 'refit', 'sqnr_after']
    """
    if config is None:
        config = CalibConfig(**options)
    elif options:
        raise DsqError(f"calibrate takes a CalibConfig or keyword settings, not both (got {', '.join(options)})")
    layers = _check_models(float_model, qmodel, report)
    _check_images(images, qmodel)
    stages: dict[str, float] = {}
    with _timed(stages, "plan"):
        chosen = plan_calibration(float_model, images, config)
    if progress:
        print(chosen.describe(config), file=sys.stderr)
    fit = images[spread_indices(len(images), chosen.fit_images)]
    probe = fit[spread_indices(len(fit), chosen.probe_images)]
    result = CalibrationReport(len(images), len(fit), source, stages, plan=chosen.to_dict())
    sqnr = dict(names=list(layers), images=probe, chunk=chosen.batch_size, progress=progress)
    with _timed(stages, "sqnr_before"):
        result.sqnr_before = output_sqnr(float_model, qmodel, desc="output SQNR before", **sqnr)
    if config.act_search:
        with _timed(stages, "act_search"):
            search_act_formats(qmodel, layers, fit, progress=progress)
    if config.refit or config.bias:
        with _timed(stages, "refit" if config.refit else "bias"):
            refit_layers(float_model, qmodel, layers, fit, fit_scales=config.refit, bias=config.bias, progress=progress)
        if config.refit and config.bias:
            stages["bias"] = 0.0  # done in the same pass
    if config.batchnorm:
        with _timed(stages, "batchnorm"):
            reestimate_batchnorm(qmodel, images, chosen.batch_size, progress=progress)
    if chosen.adapt_steps:
        result.adapt = adapt(
            float_model,
            qmodel,
            images,
            steps=chosen.adapt_steps,
            seconds=config.adapt_seconds,
            batch_size=chosen.batch_size,
            lr=config.adapt_lr,
            weights=config.adapt_weights,
            seed=config.seed,
            progress=progress,
        )
        stages["adapt"] = result.adapt.seconds
    with _timed(stages, "sqnr_after"):
        result.sqnr_after = output_sqnr(float_model, qmodel, desc="output SQNR after", **sqnr)
    _update_report(report, float_model, layers, result)
    return result


@contextmanager
def _timed(stages: dict[str, float], name: str):
    """Adds the seconds the block takes to `stages` under `name`."""
    started = time.perf_counter()
    yield
    stages[name] = time.perf_counter() - started


def _check_models(float_model, qmodel, report) -> dict[str, nn.Module]:
    """The DSConv layers of `qmodel`; DsqError unless `qmodel` and `report` come from
    dsq.quantize(float_model): every layer the report quantized is a DSConv layer of `qmodel` and
    a float conv or linear layer of the same weight shape in `float_model`."""
    if not isinstance(float_model, nn.Module) or not isinstance(qmodel, nn.Module):
        raise DsqError("calibrate needs the float model and its quantized copy as torch.nn.Modules")
    if not isinstance(report, QuantReport):
        raise DsqError(f"calibrate needs the QuantReport of dsq.quantize, not a {type(report).__name__} value")
    layers = {name: m for name, m in qmodel.named_modules() if is_dsconv(m)}
    if not layers:
        raise DsqError("the model has no DSConv layers: quantize it first (dsq.quantize)")
    if any(is_dsconv(m) for m in float_model.modules()):
        raise DsqError(
            "the float model has DSConv layers: pass the float model that was quantized, not a quantized one"
        )
    if sorted(r.name for r in report.quantized_layers) != sorted(layers):
        raise DsqError(
            "the report does not belong to the quantized model (their quantized layers differ): "
            "pass the report that dsq.quantize returned with it"
        )
    float_layers = dict(float_model.named_modules())
    for name, layer in layers.items():
        twin = float_layers.get(name)
        if not isinstance(twin, (nn.Conv2d, nn.Linear)) or list(twin.weight.shape) != list(layer.vqk.shape):
            raise DsqError(
                f"the float model does not match the quantized one at layer {name!r}: "
                "pass the model that dsq.quantize was given"
            )
    return layers


def _check_images(images, qmodel: nn.Module) -> None:
    """DsqError unless `images` is a non-empty, finite float (N, C, H, W) tensor that `qmodel` runs on."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        got = f"a {images.dim()}-d {images.dtype} tensor" if isinstance(images, torch.Tensor) else type(images).__name__
        raise DsqError(f"calibration images must be one float tensor (N, C, H, W), got {got}")
    if len(images) == 0:
        raise DsqError("no calibration images: pass a folder with images in it")
    if not all_finite(images):
        raise DsqError("the calibration images hold NaN or Inf values: check their preprocessing")
    try:
        with evaluating(qmodel):
            qmodel(images[:1])
    except (RuntimeError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DsqError(f"the calibration images {list(images.shape)} do not fit the model ({reason})") from None


def _update_report(
    report: QuantReport, float_model: nn.Module, layers: dict[str, nn.Module], result: CalibrationReport
) -> None:
    """The calibrated layers' rows derived again (weight error, activation format, output SQNRs),
    the bytes of added biases, and the calibration."""
    float_layers = dict(float_model.named_modules())
    rows = []
    for row in report.layers:
        if row.name in layers:
            derived = layer_row(
                row.name,
                float_layers[row.name].weight.detach(),
                layers[row.name],
                note=row.note,
                image_input=row.act == IMAGE_INPUT_ACT,
            )
            row = replace(
                derived, out_sqnr_before_db=result.sqnr_before[row.name], out_sqnr_after_db=result.sqnr_after[row.name]
            )
        rows.append(row)
    added = [layer.bias for name, layer in layers.items() if float_layers[name].bias is None and layer.bias is not None]
    report.layers = rows
    report.model_quantized_bytes += sum(bias.numel() * bias.element_size() for bias in added)
    report.calibration = result.to_dict()
