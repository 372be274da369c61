"""Options shared by several commands, and turning them into library objects."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import click

from ..bit_budget_measure import COARSE, DEFAULT_BUDGET_IMAGES
from ..calibration import (
    DEFAULT_ACT_MEMORY,
    DEFAULT_ADAPT_WORK,
    DEFAULT_CALIB_IMAGES,
    DEFAULT_FIT_IMAGES,
    DEFAULT_STEPS,
)
from ..config import DEFAULT_DEPTHWISE_BITS, CalibConfig, QuantConfig, layer_rule, quant_config
from ..data import Preset, get_preset, open_dataset
from ..data.folders import existing_folder
from ..errors import DsqError, os_reason
from ..fileio import check_outputs
from ..formats import DEFAULT_ROUNDS, DEFAULT_SCALE_DTYPE, DEFAULT_SUM_WEIGHT, LAYOUTS, METHODS, SCALE_DTYPES
from ..formats.spec import MAX_BITS, MIN_BITS
from ..nn import BACKENDS, WEIGHT_MODES

SMALL_MACHINE = 4  # cores


def default_workers(cores: int) -> int:
    """Image decoding processes by default. Up to SMALL_MACHINE cores none: a thread of the process
    decodes the next batch while the model runs (dsq.prefetch), as worker processes would compete
    with torch's threads for the cores and pass every batch through shared memory. On 2 cores
    (EfficientNet-Lite0, batch 64) the thread gave 46 images/s, 2 processes 36, with 20 % of
    their CPU time in the kernel. One thread decodes about 170 ImageNet images/s, more than a
    CNN runs on 4 cores."""
    return 0 if cores <= SMALL_MACHINE else min(8, cores)


DEFAULT_WORKERS = default_workers(os.cpu_count() or 1)


def stack(*decorators):
    """Apply click option decorators in the order they are listed (first one shows first)."""

    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


class GlobBits(click.ParamType):
    """'GLOB=BITS', or a JSON file of {GLOB: BITS or format} (what `dsq quantize --policy-out`
    writes; a format is {"bits": 3, "block": 256, "layout": "flat"}, any of them) -> a tuple of
    (GLOB, value) pairs, each value checked (dsq.config.layer_rule)."""

    name = "GLOB=BITS|FILE"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        if os.path.isfile(value):
            return self._policy(value, param, ctx)
        glob, _, bits = str(value).rpartition("=")
        if not glob or not bits.strip().isdigit() or not MIN_BITS <= int(bits) <= MAX_BITS:
            self.fail(
                f"{value!r} is not GLOB=BITS with BITS from {MIN_BITS} to {MAX_BITS} (e.g. 'conv1=8') "
                "nor a JSON policy file",
                param,
                ctx,
            )
        return ((glob, int(bits)),)

    def _policy(self, path: str, param, ctx) -> tuple[tuple[str, int | dict], ...]:
        example = f'e.g. {{"conv1": 8, "layer1.*": {MIN_BITS}}}'
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as error:
            self.fail(f"cannot read {path}: {os_reason(error)}", param, ctx)
        except ValueError:  # not UTF-8, or not JSON
            self.fail(f"{path} is not a JSON file of {{glob: bits}}, {example}", param, ctx)
        if not isinstance(data, dict) or not data:
            self.fail(f"{path} must hold one non-empty JSON object mapping globs to bits, {example}", param, ctx)
        for glob, value in data.items():
            try:
                layer_rule(glob, value)
            except DsqError as error:
                self.fail(f"{path}: {error}", param, ctx)
        return tuple(data.items())


class FloatList(click.ParamType):
    """'3,3.5,4' -> [3.0, 3.5, 4.0] (duplicates dropped), each a number above 0."""

    name = "X,X,..."

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            numbers = [float(p) for p in str(value).split(",")]
        except ValueError:
            numbers = []
        if not numbers or not all(0 < n < float("inf") for n in numbers):
            self.fail(f"{value!r} is not a comma-separated list of numbers above 0, e.g. 3,3.5,4", param, ctx)
        return list(dict.fromkeys(numbers))


class IntList(click.ParamType):
    """'2,3,4' -> [2, 3, 4] (duplicates dropped), each whole number from `low` to `high`."""

    name = "N,N,..."

    def __init__(self, low: int, high: int | None = None):
        self.low, self.high = low, high

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        parts = [p.strip() for p in str(value).split(",")]
        top = "" if self.high is None else f" to {self.high}"
        if not all(p.isdigit() and self.low <= int(p) <= (self.high or int(p)) for p in parts):
            self.fail(f"{value!r} is not a comma-separated list of whole numbers from {self.low}{top}", param, ctx)
        return list(dict.fromkeys(map(int, parts)))


class NameList(click.ParamType):
    """'a,b' -> ['a', 'b'] (duplicates dropped), each one of `choices`."""

    name = "NAME,NAME,..."

    def __init__(self, choices: tuple[str, ...]):
        self.choices = choices

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        names = [p.strip() for p in str(value).split(",")]
        unknown = [n for n in names if n not in self.choices]
        if unknown:
            listed = f"unknown {', '.join(map(repr, unknown))} in {value!r}"
            self.fail(f"{listed}: use some of {', '.join(self.choices)}, comma-separated", param, ctx)
        return list(dict.fromkeys(names))


class InputPath(click.Path):
    """A file or folder the command reads: no output may overwrite it or lie in it."""

    def check(self, value: str, param: click.Parameter) -> None:
        """DsqError now, before any work, if `value` cannot be what the command reads (none here)."""


class InputFolder(InputPath):
    """A folder of images the command reads: it must exist and hold something."""

    def check(self, value: str, param: click.Parameter) -> None:
        folder = existing_folder(value)
        with os.scandir(folder) as entries:
            if all(entry.name.startswith(".") for entry in entries):
                raise DsqError(f"{param.opts[0]} folder {folder} is empty: it holds no images")


class Outputs:
    """A parameter naming files the command writes."""

    def files(self, value: str) -> list[str]:
        return [value]


class OutputFile(Outputs, click.Path):
    """A file the command writes."""

    def __init__(self):
        super().__init__(dir_okay=False)


class OutputStem(Outputs, click.ParamType):
    """STEM of the files STEM.EXT the command writes, one per extension."""

    name = "STEM"

    def __init__(self, *extensions: str):
        self.extensions = extensions

    def files(self, value: str) -> list[str]:
        return [f"{value}.{extension}" for extension in self.extensions]


# Option lists are declarations, one option in two or three lines: the formatter leaves them so.
# fmt: off
model_options = stack(
    click.argument("model", type=InputPath()),
    click.option("--arch",
                 help="Architecture of a weights file, when its name does not say it "
                      "(e.g. resnet50, cifar_resnet20, efficientnet_lite0, timm/convnext_atto)."),
    click.option("--checkpoint", type=InputPath(),
                 help="Weights of the model MODEL names (a .safetensors or .pth state_dict), "
                      "e.g. timm/resnet50 --checkpoint model.safetensors."),
    click.option("--trust-pickle", is_flag=True, default=False,
                 help="Allow a full pickle checkpoint; it can run code, so only for files you trust."),
)

grid_options = stack(
    click.option("-b", "--bits", type=click.IntRange(MIN_BITS, MAX_BITS), default=4,
                 help="Bits per weight integer (VQK)."),
    click.option("--block", type=click.IntRange(min=1), default=32,
                 help="Block size: weights sharing one scale (KDS), channels sharing one exponent."),
)

recipe_options = stack(
    click.option("--method", type=click.Choice(METHODS), default="l2",
                 help="How the KDS is fitted: closed-form L2 or KL divergence."),
    click.option("--rounds", type=click.IntRange(min=0), default=DEFAULT_ROUNDS,
                 help="L2 refinement rounds after the paper's one-pass fit (0: the paper's method)."),
    click.option("--sum-weight", type=click.FloatRange(min=0), default=DEFAULT_SUM_WEIGHT,
                 help="Weight of each block's sum error in the L2 scale fit (0: plain least squares, "
                      "the paper's); the default suits inputs after BN + ReLU."),
    click.option("--layout", type=click.Choice(LAYOUTS), default="auto",
                 help="Block layout: channel blocks, flat (in-channels x taps) blocks, or auto "
                      "(flat for grouped or depthwise convs with fewer input channels per group than the block)."),
    click.option("--act/--no-act", "act", default=True, help="Round conv inputs to block floating point (BFP)."),
    click.option("--act-bits", type=click.IntRange(MIN_BITS, MAX_BITS), default=8,
                 help="BFP mantissa bits, sign included."),
    click.option("--act-block", type=click.IntRange(min=1), default=None,
                 help="Channels per BFP block  [default: --block]"),
    click.option("--quantize-image-input/--float-image-input", default=False,
                 help="Round the first conv's input (the image) to BFP too."),
    click.option("--include", multiple=True, default=("*",), help="Glob on layer names to quantize; repeatable."),
    click.option("--exclude", "--keep-float", "exclude", multiple=True, default=(),
                 help="Glob on layer names to keep float; repeatable."),
    click.option("--layer-bits", type=GlobBits(), multiple=True, default=(),
                 help="Give the layers whose names match GLOB BITS-bit weights instead of --bits "
                      "(the first matching GLOB wins); repeatable, e.g. 'conv1=8', or a JSON file of "
                      "{GLOB: BITS} or {GLOB: {\"bits\": 3, \"block\": 256, \"layout\": \"flat\"}} such as "
                      "--policy-out writes (replays a --target-bits policy)."),
    click.option("--depthwise-bits", type=click.IntRange(MIN_BITS, MAX_BITS), default=DEFAULT_DEPTHWISE_BITS,
                 help="Bits of depthwise convs' weights (--layer-bits globs take precedence)."),
    click.option("--quantize-linear/--float-linear", default=False, help="Quantize linear layers too (as 1x1 convs)."),
    click.option("--scale-dtype", type=click.Choice(list(SCALE_DTYPES)), default=DEFAULT_SCALE_DTYPE,
                 help="Precision of the KDS scales, in the model and in the -o file; "
                      "float16 saves 16 bits per block (4.5 instead of 5 bits per weight at "
                      "4 bits, block 32)."),
)

format_options = stack(grid_options, recipe_options)

BUDGET_HELP = (
    "Choose each quantized layer's weight bits ({MIN}-{MAX}, depthwise convs and the image input included), in "
    "--block blocks or in flat blocks {C}x as long, so that the mean bits per weight, scales included, is at most "
    "X and the summed measured cost (each layer's added output KL, after a refit when the calibration refits; "
    "docs/bit-budget.md) is least; measured on at most {N} of the --calib images, spread over them, else on at "
    "most {N} --data images spread over it (then also evaluated). --layer-bits layers keep their bits (and count)."
).format(MIN=MIN_BITS, MAX=MAX_BITS, N=DEFAULT_BUDGET_IMAGES, C=COARSE)

backend_option = click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="simulate",
    help="How quantized layers compute: simulate (float32 arithmetic on the quantized values), int "
    "(int8 weights x int8 BFP mantissas summed exactly; layers with a float input as exact) or exact "
    "(simulate in float64, rounded once to float32: what int equals bit for bit).",
)
# fmt: on


def quant_options(o: dict) -> dict:
    """The options of `dsq.config.quant_config` from the parsed format options."""
    return dict(
        bits=o["bits"],
        block=o["block"],
        method=o["method"],
        rounds=o["rounds"],
        sum_weight=o["sum_weight"],
        layout=o["layout"],
        act_bits=o["act_bits"] if o["act"] else None,
        act_block=o["act_block"],
        include=tuple(o["include"]),
        exclude=tuple(o["exclude"]),
        layer_bits=dict(pair for pairs in o["layer_bits"] for pair in pairs),
        depthwise_bits=o["depthwise_bits"],
        quantize_linear=o["quantize_linear"],
        quantize_image_input=o["quantize_image_input"],
        scale_dtype=o["scale_dtype"],
    )


def config_from(o: dict, **options) -> QuantConfig:
    """The QuantConfig the parsed format options describe, with `options` of `quant_config` in place
    of theirs (a sweep: one bits and block of its grid)."""
    return quant_config(**{**quant_options(o), **options})


# fmt: off
calib_options = stack(
    click.option("--calib", type=InputFolder(), default=None,
                 help="Folder of unlabelled images to calibrate on (any images, sub-folders too; labels ignored). "
                      "Images it shares with --data are left out of the evaluation."),
    click.option("--calib-images", type=click.IntRange(min=1), default=DEFAULT_CALIB_IMAGES,
                 help="How many calibration images, taken in turn from the sub-folders of --calib."),
    click.option("--act-search/--no-act-search", default=False,
                 help="Give each layer the BFP mantissa bits and block size (at most --act-bits bits and "
                      "--act-block's bits per activation, exponents included) that keep its output closest on the "
                      "calibration images; before the refit."),
    click.option("--refit/--no-refit", default=True,
                 help="Refit each layer's integers and scales to its output on the calibration images."),
    click.option("--refit-images", type=click.IntRange(min=1), default=None,
                 help="Calibration images the refit and bias correction run on, all at once (memory: a few of the "
                      f"network's largest activations per image)  [default: {DEFAULT_FIT_IMAGES}, fewer where "
                      f"those would pass {DEFAULT_ACT_MEMORY // 2**30} GiB]"),
    click.option("--bias-correction/--no-bias-correction", default=False,
                 help="Give each quantized layer the float layer's mean output (adds a bias where none is)."),
    click.option("--bn-reestimate/--no-bn-reestimate", default=False,
                 help="Re-estimate BatchNorm statistics on the quantized network's activations."),
    click.option("--adapt-steps", type=click.IntRange(min=0), default=None,
                 help="Distillation steps: the float network teaches the quantized one (0: none)  [default: as many "
                      f"as a work budget of {DEFAULT_ADAPT_WORK / 1e12:g} T multiply-accumulate equivalents allows on "
                      f"the model, at most {DEFAULT_STEPS}; {DEFAULT_STEPS} with --adapt-time]"),
    click.option("--adapt-time", type=click.FloatRange(min=0, min_open=True), default=None,
                 help="Stop distillation after this many seconds  [default: no limit]"),
    click.option("--adapt-weights", type=click.Choice(WEIGHT_MODES), default="fixed",
                 help="During distillation: fixed keeps the integers and trains only the float parts, ste "
                      "re-derives them through a straight-through estimator, learned learns each weight's "
                      "rounding down or up from the float weight (AdaRound)."),
    click.option("--seed", type=int, default=0, help="Seed of the calibration's random choices."),
)
# fmt: on


# The CalibConfig field each calibration option sets.
CALIB_OPTIONS = {
    "act_search": "act_search",
    "refit": "refit",
    "bias": "bias_correction",
    "batchnorm": "bn_reestimate",
    "adapt_steps": "adapt_steps",
    "adapt_seconds": "adapt_time",
    "adapt_weights": "adapt_weights",
    "fit_images": "refit_images",
    "seed": "seed",
}


def calib_config_from(o: dict) -> CalibConfig | None:
    """The CalibConfig the parsed calibration options describe (None without --calib)."""
    if not o["calib"]:
        return None
    return CalibConfig(**{field: o[option] for field, option in CALIB_OPTIONS.items()})


# fmt: off
def data_options(required: bool):
    return stack(
        click.option("--data", "data", type=InputFolder(), required=required,
                     help="Labelled images: one sub-folder per class, or ImageNet val as Kaggle, the devkit or "
                          "torchvision lay it out (the layout is detected and named)."),
        click.option("--classes", type=InputPath(),
                     help="Text file of class names in the model's output order, one per line "
                          "(needed for wnid folders when not all 1000 are present, and for Kaggle's CSV)."),
        click.option("--limit", type=click.IntRange(min=1), default=None,
                     help="Evaluate N images spread evenly over the data  [default: all]"),
        click.option("--batch-size", type=click.IntRange(min=1), default=64),
        click.option("-j", "--workers", type=click.IntRange(min=0), default=DEFAULT_WORKERS,
                     help="Image decoding processes (0: a thread decodes the next batch while the model runs)."),
        click.option("--device", default="cpu", help="Where to evaluate: cpu, cuda, cuda:1, ..."),
        click.option("--preset",
                     help="Preprocessing preset (imagenet, efficientnet_lite0/1/2, cifar10, or timm/<model>: "
                          "that timm model's)  [default: the model's]"),
        click.option("--resize", help="Override the preset's resize (shorter side, pixels)."),
        click.option("--crop", help="Override the preset's centre crop (pixels)."),
        click.option("--mean", help="Override the preset's mean, e.g. 0.485,0.456,0.406."),
        click.option("--std", help="Override the preset's std, e.g. 0.229,0.224,0.225."),
    )
# fmt: on


def preset_from(o: dict, model_preset: str | Preset) -> Preset:
    """--preset, else the model's preset (a name, or the Preset a dsq file holds), with --resize,
    --crop, --mean and --std applied."""
    if o["preset"] or isinstance(model_preset, str):
        model_preset = get_preset(o["preset"] or model_preset)
    return model_preset.replace(resize=o["resize"], crop=o["crop"], mean=o["mean"], std=o["std"])


def dataset_from(o: dict, preset):
    """The labelled dataset named by --data (None when not given)."""
    if not o["data"]:
        return None
    return open_dataset(o["data"], preset.transform(), o["classes"])


def eval_kwargs(o: dict) -> dict:
    return dict(batch_size=o["batch_size"], workers=o["workers"], limit=o["limit"], device=o["device"])


quiet_option = click.option("-q", "--quiet", is_flag=True, default=False, help="No progress bars or per-layer table.")

output_options = stack(
    click.option("--json", "json_path", type=OutputFile(), help="Write all results as JSON here."),
    quiet_option,
)


def pass_options(f):
    """Collect every option into one dict argument `o` (commands read what they need), after the
    cheap checks that spare a doomed run its work: the input folders hold something, and every
    output can be written without destroying an input or another output (`fileio.check_outputs`)."""

    @functools.wraps(f)
    def wrapper(**o):
        check_paths(click.get_current_context().command.params, o)
        return f(o)

    return wrapper


def check_paths(params: list[click.Parameter], o: dict) -> None:
    """Check the inputs and outputs that the parameters of type InputPath and Outputs name."""
    inputs, outputs = [], []
    for param in params:
        value = o.get(param.name)
        if value is None:
            continue
        if isinstance(param.type, InputPath):
            param.type.check(value, param)
            inputs.append(value)
        elif isinstance(param.type, Outputs):
            outputs += param.type.files(value)
    check_outputs(outputs, inputs)
