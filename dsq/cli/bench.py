"""`dsq bench`: images per second and peak memory of a model on each runtime, side by side."""

from __future__ import annotations

import click
import torch
import torch.nn as nn

from .. import artifact, report
from ..bench import (
    DEFAULT_BATCH_SIZES,
    DEFAULT_REPEATS,
    DEFAULT_SIDE,
    DEFAULT_WARMUP,
    RUNTIMES,
    benchmark,
    dequantized_float,
    input_side,
)
from ..config import quant_config
from ..convert import quantize
from ..data import Preset, get_preset
from ..errors import DsqError
from ..fileio import write_json
from ..models import load_model
from ..workflow import versions
from .evaluate import file_classes, file_preset
from .options import (
    IntList,
    NameList,
    OutputFile,
    config_from,
    format_options,
    model_options,
    pass_options,
    quiet_option,
    stack,
)

# The options that are `dsq.bench.benchmark`'s keywords of the same names.
BENCHMARK_OPTIONS = ("runtimes", "batch_sizes", "repeats", "warmup", "threads", "memory")

# fmt: off
bench_options = stack(
    click.option("--batch-sizes", type=IntList(1), default=",".join(map(str, DEFAULT_BATCH_SIZES)),
                 help="Images per forward, comma-separated; each batch size is timed on its own."),
    click.option("--runtimes", type=NameList(RUNTIMES), default=",".join(RUNTIMES),
                 help="What to time, comma-separated: float32 (torch eager), dsq's simulate, int and int-fused "
                      "backends, torch-int8 (torch's x86 int8, FX static per-channel), onnxruntime-float32 and "
                      "onnxruntime-int8 (QDQ static per-channel; need dsq[onnx])."),
    click.option("--repeats", type=click.IntRange(min=1), default=DEFAULT_REPEATS,
                 help="Timed rounds over the runtimes; the table gives each runtime's median."),
    click.option("--warmup", type=click.IntRange(min=1), default=DEFAULT_WARMUP,
                 help="Untimed rounds before them; the first checks that each runtime runs."),
    click.option("--threads", type=click.IntRange(min=1), default=torch.get_num_threads(),
                 help="Threads of torch and onnxruntime (torch's own number by default)."),
    click.option("--input-size", type=click.IntRange(1, 1024), default=None,
                 help=f"Side of the square random images  [default: the preset's crop or resize, else {DEFAULT_SIDE}]"),
    click.option("--memory/--no-memory", default=True,
                 help="Measure each runtime's peak memory: a fresh process per runtime and batch size."),
    click.option("-o", "--json", "json_path", type=OutputFile(), help="Write all results as JSON here."),
)
# fmt: on


@click.command("bench")
@model_options
@format_options
@bench_options
@quiet_option
@pass_options
def bench_command(o):
    """Time MODEL (a weights file, a model name, or a quantized dsq file) quantized as the options
    say, on every runtime side by side (interleaved, medians); print images per second, the ratio to
    float32's, and each runtime's peak memory."""
    model, qmodel, preset, quantization = bench_models(o)
    side = o["input_size"] or input_side(preset)
    settings = {option: o[option] for option in BENCHMARK_OPTIONS}
    result = benchmark(model, qmodel, side=side, progress=not o["quiet"], **settings)
    click.echo(report.bench_summary(result))
    click.echo(report.bench_table(result))
    if o["json_path"]:
        results = {"model": o["model"], "quantization": quantization, **result.to_dict(), "versions": versions()}
        write_json(o["json_path"], results)
        click.echo(f"wrote {o['json_path']}")


def bench_models(o: dict) -> tuple[nn.Module, nn.Module, Preset, dict]:
    """(float model, dsq model, preset, quantization settings) of MODEL: a float model and its dsq
    model quantized as the options say, or a dsq file's model and its architecture with the file's
    dequantized weights."""
    if not artifact.is_dsq_file(o["model"]):
        loaded = load_model(o["model"], o["arch"], o["trust_pickle"], o["checkpoint"])
        qmodel, quant_report = quantize(loaded.model, config_from(o), progress=not o["quiet"])
        return loaded.model, qmodel, get_preset(loaded.preset), quant_report.config.to_dict()
    if config_from(o) != quant_config():
        raise DsqError(
            f"{o['model']} is a quantized dsq file, whose format is its own: drop the format options "
            "(--bits, --block, ...)"
        )
    qmodel, recipe = artifact.load(o["model"])
    model = dequantized_float(qmodel, recipe["arch"], file_classes(recipe))
    return model, qmodel, file_preset(o["model"], recipe), recipe["settings"]
