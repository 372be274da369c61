"""`dsq sweep`: accuracy over a grid of weight bits x block sizes, resumable."""

from __future__ import annotations

import click

from .. import report
from ..bit_budget import budget_images
from ..formats.spec import MAX_BITS, MIN_BITS
from ..sweep import Sweep
from .options import (
    BUDGET_HELP,
    FloatList,
    IntList,
    calib_options,
    config_from,
    data_options,
    eval_kwargs,
    model_options,
    pass_options,
    quiet_option,
    recipe_options,
)
from .runs import announce, finish, load_model_and_data, run_options


@click.command("sweep")
@model_options
@click.option(
    "-b",
    "--bits",
    type=IntList(MIN_BITS, MAX_BITS),
    default="2,3,4,8",
    help="Weight bits to try, comma-separated.",
)
@click.option("--block", type=IntList(1), default="8,16,32,64,128", help="Block sizes to try, comma-separated.")
@click.option(
    "--target-bits",
    type=FloatList(),
    default=None,
    metavar="X,X,...",
    help="Bit budgets to try beside the uniform --bits points, comma-separated, each at every --block. "
    + BUDGET_HELP
    + "  [default: none]",
)
@recipe_options
@data_options(required=True)
@calib_options
@run_options("sweep")
@quiet_option
@pass_options
def sweep_command(o):
    """Evaluate MODEL on --data as float once, then quantized at every combination of --bits and
    --block (and at every --target-bits budget); print the table, write it as CSV and JSON, and plot
    top-1 against bits per weight.

    Each point is saved as soon as its pass ends: run the same command again after an interruption
    and it continues where it stopped.
    """
    bits, blocks = o["bits"], o["block"]
    config = config_from(o, bits=bits[0], block=blocks[0])  # each point replaces the weight bits and block
    loaded, dataset, settings, calibration = load_model_and_data(o)
    targets = o["target_bits"] or []
    sweep = Sweep(
        bits,
        blocks,
        config,
        act_block_follows=o["act_block"] is None,
        calibration=calibration,
        targets=targets,
        budget_images=budget_images(None, dataset) if targets and calibration is None else None,
        settings=settings,
        output=o["output"],
        resume=o["resume"],
    )
    announce(sweep)
    sweep.run(loaded.model, dataset, per_pass=o["per_pass"], progress=not o["quiet"], **eval_kwargs(o))
    click.echo(report.sweep_table(sweep))
    finish(sweep, report.plot_sweep)
