"""`dsq sensitivity`: which layers cost accuracy when quantized, ranked, and what to do about it."""

from __future__ import annotations

import click

from .. import report
from ..sensitivity import Sensitivity
from .options import config_from, data_options, eval_kwargs, format_options, model_options, pass_options, quiet_option
from .runs import announce, finish, load_model_and_data, run_options


@click.command("sensitivity")
@model_options
@format_options
@data_options(required=True)
@run_options("sensitivity")
@quiet_option
@pass_options
def sensitivity_command(o):
    """Rank the layers of MODEL by the top-1 they cost on --data: quantize only one layer at a time,
    and all layers but one; print the ranking, write it as CSV and JSON, and plot it.

    Act on it with --keep-float GLOB or --layer-bits GLOB=BITS on quantize and sweep.
    """
    loaded, dataset, settings, _ = load_model_and_data(o)
    run = Sensitivity(config_from(o), settings=settings, output=o["output"], resume=o["resume"])
    announce(run)
    run.run(loaded.model, dataset, per_pass=o["per_pass"], progress=not o["quiet"], **eval_kwargs(o))
    base, everything = run.results["float"], run.results["all quantized"]
    click.echo(f"top-1: float {base['top1']:.2f} %, all quantized {everything['top1']:.2f} %\n")
    click.echo(report.sensitivity_table(run))
    worst = run.worst()
    if worst:
        click.echo("\nto keep the most damaging layers float:  " + " ".join(f"--keep-float '{n}'" for n in worst))
        click.echo("or to give them 8-bit weights:  " + " ".join(f"--layer-bits '{n}=8'" for n in worst))
    finish(run, report.plot_sensitivity)
