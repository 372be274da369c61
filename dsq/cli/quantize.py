"""`dsq quantize`: quantize a float model, report per layer, optionally evaluate and save."""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from .. import artifact, report
from ..errors import DsqError
from ..fileio import write_json
from ..models import load_model
from ..workflow import quantize_and_evaluate
from .options import (
    BUDGET_HELP,
    OutputFile,
    backend_option,
    calib_config_from,
    calib_options,
    config_from,
    data_options,
    dataset_from,
    eval_kwargs,
    format_options,
    model_options,
    output_options,
    pass_options,
    preset_from,
)

LOW_FLOAT_WARNING = 15.0  # points below the published top-1 that suggest wrong preprocessing or labels


@click.command("quantize")
@model_options
@format_options
@data_options(required=False)
@calib_options
@click.option(
    "-o", "--output", type=OutputFile(), help="Write the quantized model here (a safetensors file dsq loads again)."
)
@click.option(
    "--target-bits",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="X",
    help=BUDGET_HELP + "  [default: off: --bits everywhere]",
)
@click.option(
    "--policy-out",
    type=OutputFile(),
    help="Write the --target-bits policy here as JSON {layer: bits or format}; --layer-bits FILE replays it.",
)
@backend_option
@output_options
@pass_options
def quantize_command(o):
    """Quantize MODEL (a weights file or a model name) to DSConv and report per layer.

    With --data, evaluate the float and the quantized model on the same images.
    """
    check_budget_options(o)
    if artifact.is_dsq_file(o["model"]):
        raise DsqError(
            f"{o['model']} is already a quantized dsq model: evaluate it with `dsq eval`, "
            "look inside with `dsq inspect`, or quantize the float checkpoint instead"
        )
    loaded = load_model(o["model"], o["arch"], o["trust_pickle"], o["checkpoint"])
    preset = preset_from(o, loaded.preset)
    dataset = dataset_from(o, preset)
    if dataset is not None:
        click.echo(f"data: {dataset.describe()}", err=True)
    run = quantize_and_evaluate(
        loaded,
        config_from(o),
        dataset,
        eval_options=eval_kwargs(o),
        progress=not o["quiet"],
        calib=o["calib"],
        calib_images=o["calib_images"],
        calib_config=calib_config_from(o),
        transform=preset.transform(),
        backend=o["backend"],
        target_bits=o["target_bits"],
    )
    if run.data and dataset is not None and run.data != dataset.describe():
        click.echo(f"evaluated on: {run.data}", err=True)
    if run.budget is not None:
        show_budget(run.budget, quiet=o["quiet"])
    show_run(run, quiet=o["quiet"])
    if o["policy_out"]:
        write_json(o["policy_out"], run.budget.layer_bits())
        click.echo(f"wrote {o['policy_out']}: replay it with --layer-bits {o['policy_out']}")
    if o["output"]:
        artifact.save(
            o["output"],
            run.qmodel,
            run.report,
            arch=loaded.arch,
            num_classes=loaded.num_classes,
            preset=preset.to_dict(),
            accuracy=run.accuracy_dict(),
        )
        click.echo(f"wrote {o['output']}: {file_size_note(o['output'], loaded.source, run.report.model_float_bytes)}")
    if o["json_path"]:
        write_json(o["json_path"], run.to_dict())
        click.echo(f"wrote {o['json_path']}")


def check_budget_options(o: dict) -> None:
    """DsqError for --target-bits without images to measure on or with the options it replaces, and for
    --policy-out without it."""
    if o["target_bits"] is None:
        if o["policy_out"]:
            raise DsqError("--policy-out writes the policy that --target-bits chooses: give --target-bits too")
        return
    if not (o["calib"] or o["data"]):
        raise DsqError("--target-bits measures each layer's cost on images: give --calib or --data")
    given = click.get_current_context().get_parameter_source
    clash = [
        f"--{name.replace('_', '-')}" for name in ("bits", "depthwise_bits") if given(name) != ParameterSource.DEFAULT
    ]
    if clash:
        raise DsqError(
            f"--target-bits chooses every layer's bits, so {' and '.join(clash)} would be ignored: drop "
            f"{'them' if len(clash) > 1 else 'it'}, or pin layers with --layer-bits"
        )


def show_budget(budget, quiet: bool = False) -> None:
    """The policy a bit budget chose (unless quiet) and what it costs, in one line."""
    if not quiet:
        click.echo(report.budget_table(budget))
        click.echo()
    click.echo(report.budget_summary(budget))
    click.echo()


def file_size_note(written: str, source: str, float_state_bytes: int) -> str:
    """The written file's real size and its ratio to the float checkpoint file (or, for a model
    loaded by name, to its float32 parameters and buffers)."""
    size = Path(written).stat().st_size
    checkpoint = Path(source).expanduser()
    if checkpoint.is_file():
        base, what = checkpoint.stat().st_size, f"the float checkpoint {checkpoint.name}"
    else:
        base, what = float_state_bytes, f"the float32 state of {source}"
    return f"{size:,} bytes ({size / 1e6:.2f} MB), {base / size:.2f}x smaller than {what} ({base:,} bytes)"


def show_run(run, quiet: bool = False) -> None:
    """Print the per-layer table, the summary and the accuracy table of a run."""
    if not quiet:
        click.echo(report.layer_table(run.report))
        click.echo()
    click.echo(report.summary(run.report))
    if run.accuracy:
        click.echo()
        click.echo(report.accuracy_table(run.accuracy))
        warn_low_float(run)


def warn_low_float(run) -> None:
    known, measured = run.loaded.known_top1, run.accuracy["float"]
    if known is not None and measured.images >= 500 and measured.top1 < known - LOW_FLOAT_WARNING:
        click.echo(
            f"warning: float top-1 {measured.top1:.1f} % is far below the {known:.1f} % these weights "
            "reach: check the preprocessing (--preset) and the labels (--classes)",
            err=True,
        )
