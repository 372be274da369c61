"""`dsq export`: a quantized dsq file as an ONNX file for onnxruntime, or a plain torch state_dict."""

from __future__ import annotations

import click
import torch

from .. import artifact
from ..errors import DsqError
from ..exporters import FORMATS, export, format_of
from .evaluate import file_classes, file_preset
from .options import InputPath, OutputFile, pass_options

DEFAULT_TRACE_SIDE = 32  # for presets that take images as they come (CIFAR-10's 32x32)


@click.command("export")
@click.argument("model", type=InputPath(dir_okay=False))
@click.option("-o", "--output", type=OutputFile(), required=True, help="The file to write (.onnx or .pth).")
@click.option(
    "--format",
    "format_",
    type=click.Choice(FORMATS),
    default=None,
    help="onnx: opset 21 for onnxruntime; pth: a state_dict of the dequantized weights for the float "
    "architecture  [default: from the -o suffix]",
)
@click.option(
    "--weights-only",
    is_flag=True,
    default=False,
    help="ONNX without the BFP rounding of activations (plain DequantizeLinear -> Conv).",
)
@click.option(
    "--input-size",
    type=click.IntRange(1, 1024),
    default=None,
    help="Side of the square images the ONNX graph is traced with (height and width stay dynamic where the "
    f"model allows)  [default: the preset's crop or resize, else {DEFAULT_TRACE_SIDE}]",
)
@pass_options
def export_command(o):
    """Export MODEL (a quantized dsq file) to run elsewhere: ONNX for onnxruntime, or .pth for torch."""
    if not artifact.is_dsq_file(o["model"]):
        raise DsqError(f"{o['model']} is not a dsq file: export takes what dsq quantize -o wrote (a .dsq file)")
    format_ = o["format_"] or format_of(o["output"])
    qmodel, recipe = artifact.load(o["model"])
    preset = file_preset(o["model"], recipe)
    example = None
    if format_ == "onnx":
        side = o["input_size"] or preset.crop or preset.resize or DEFAULT_TRACE_SIDE
        example = torch.zeros(2, 3, side, side)
        click.echo(f"tracing {recipe.get('arch') or 'the model'} at {side}x{side} through torch.onnx ...", err=True)
    metadata = {"arch": recipe.get("arch"), "num_classes": file_classes(recipe), "preset": preset.to_dict()}
    size = export(qmodel, o["output"], example, format=format_, weights_only=o["weights_only"], metadata=metadata)
    click.echo(f"wrote {o['output']} ({size} bytes, {format_}{', weights only' if o['weights_only'] else ''})")
