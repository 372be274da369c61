"""`dsq eval`: top-1/top-5 of a float model or a quantized dsq file."""
from __future__ import annotations

import click

from .. import artifact, report
from ..data import check_labels, get_preset
from ..evaluate import evaluate
from ..fileio import write_json
from ..models import load_model
from ..nn import set_backend
from ..workflow import versions
from .options import (backend_option, data_options, dataset_from, eval_kwargs, model_options, output_options,
                      pass_options, preset_from)


@click.command("eval")
@model_options
@data_options(required=True)
@backend_option
@output_options
@pass_options
def eval_command(o):
    """Evaluate MODEL (a weights file, a model name, or a quantized dsq file) on --data."""
    if artifact.is_dsq_file(o["model"]):
        model, recipe = artifact.load(o["model"])
        preset_name, num_classes, kind = recipe["preset"]["name"], recipe["num_classes"], "quantized"
    else:
        loaded = load_model(o["model"], o["arch"], o["trust_pickle"])
        model, preset_name, num_classes, kind = loaded.model, loaded.preset, loaded.num_classes, "float"
    if o["backend"] != "simulate":
        set_backend(model, o["backend"])
    preset = preset_from(o, preset_name) if o["preset"] or preset_name else get_preset("imagenet")
    dataset = dataset_from(o, preset)
    click.echo(f"data: {dataset.describe()}", err=True)
    check_labels(dataset, num_classes)
    results = evaluate({kind: model}, dataset, progress=not o["quiet"], **eval_kwargs(o))
    click.echo(report.accuracy_table(results))
    if o["json_path"]:
        write_json(o["json_path"], {"model": o["model"], "kind": kind, "data": dataset.describe(),
                                    "accuracy": results[kind].to_dict(), "versions": versions()})
        click.echo(f"wrote {o['json_path']}")
