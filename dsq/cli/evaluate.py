"""`dsq eval`: top-1/top-5 of a float model or a quantized dsq file."""

from __future__ import annotations

from pathlib import Path

import click

from .. import artifact, report
from ..data import Preset, check_labels, get_preset
from ..errors import DsqError
from ..evaluate import evaluate
from ..exporters import load_onnx
from ..fileio import write_json
from ..models import load_model
from ..models.registry import get_arch
from ..nn import set_backend
from ..workflow import versions
from .options import (
    backend_option,
    data_options,
    dataset_from,
    eval_kwargs,
    model_options,
    output_options,
    pass_options,
    preset_from,
)


@click.command("eval")
@model_options
@data_options(required=True)
@backend_option
@output_options
@pass_options
def eval_command(o):
    """Evaluate MODEL (a weights file, a model name, a quantized dsq file, or an ONNX file that
    dsq export wrote, run by onnxruntime) on --data."""
    if is_onnx_file(o["model"]):
        model, model_preset, num_classes, kind = onnx_model(o)
    elif artifact.is_dsq_file(o["model"]):
        model, recipe = artifact.load(o["model"])
        model_preset, num_classes, kind = file_preset(o["model"], recipe), file_classes(recipe), "quantized"
    else:
        loaded = load_model(o["model"], o["arch"], o["trust_pickle"], o["checkpoint"])
        model, model_preset, num_classes, kind = loaded.model, loaded.preset, loaded.num_classes, "float"
    if o["backend"] != "simulate":
        set_backend(model, o["backend"])
    preset = preset_from(o, model_preset)
    dataset = dataset_from(o, preset)
    click.echo(f"data: {dataset.describe()}", err=True)
    if num_classes is not None:
        check_labels(dataset, num_classes)
    results = evaluate({kind: model}, dataset, progress=not o["quiet"], **eval_kwargs(o))
    click.echo(report.accuracy_table(results))
    if o["json_path"]:
        write_json(
            o["json_path"],
            {
                "model": o["model"],
                "kind": kind,
                "data": dataset.describe(),
                "accuracy": results[kind].to_dict(),
                "versions": versions(),
            },
        )
        click.echo(f"wrote {o['json_path']}")


def is_onnx_file(path: str) -> bool:
    return Path(path).suffix.lower() == ".onnx"


def onnx_model(o: dict) -> tuple:
    """(model, preset, classes, kind) of an ONNX file: onnxruntime behind a torch call, the
    preset and class count that dsq export stored in it (--preset and --classes otherwise)."""
    if o["backend"] != "simulate":
        raise DsqError(f"--backend {o['backend']} is for dsq models; onnxruntime runs {o['model']} as it is")
    model = load_onnx(o["model"])
    meta = model.metadata
    if "preset" in meta:
        preset = Preset.from_dict(meta["preset"], where=f"the preset in {o['model']}")
    elif o["preset"]:
        preset = o["preset"]
    else:
        raise DsqError(f"{o['model']} does not say how to preprocess its images (not from dsq export): give --preset")
    return model, preset, meta.get("num_classes"), "onnx"


def file_preset(path: str, recipe: dict) -> Preset:
    """The preprocessing a dsq file's model was quantized with: its recipe's, overrides included,
    else (a file saved from Python without one) its architecture's."""
    if recipe.get("preset") is None:
        return get_preset(get_arch(recipe["arch"]).preset)
    return Preset.from_dict(recipe["preset"], where=f"the preset in {path}")


def file_classes(recipe: dict) -> int:
    """The number of classes of a loaded dsq file's model: its recipe's, else its architecture's
    (what `artifact.load` built it with)."""
    return recipe.get("num_classes") or get_arch(recipe["arch"]).num_classes
