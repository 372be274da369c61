"""What `dsq sweep` and `dsq sensitivity` share: their output options, loading, and finishing."""

from __future__ import annotations

import click

from ..calibration import calibration_set
from ..data import check_labels
from ..errors import DsqError
from ..models import load_model
from .options import OutputStem, calib_config_from, dataset_from, preset_from, stack


# fmt: off  (an option list: one option in two or three lines, as in cli/options.py)
def run_options(default_output: str):
    return stack(
        click.option(
            "-o",
            "--output",
            type=OutputStem("json", "csv", "png"),
            default=default_output,
            metavar="STEM",
            help="Write STEM.json, STEM.csv and STEM.png; STEM.json is also where an interrupted run resumes from.",
        ),
        click.option(
            "--resume/--no-resume",
            default=True,
            help="Skip the models STEM.json already holds from a run with the same settings.",
        ),
        click.option(
            "--per-pass",
            type=click.IntRange(min=1),
            default=4,
            help="Models evaluated together on each pass over the images (each image is decoded once "
            "for all of them); results are saved after every pass.",
        ),
    )


# fmt: on


def load_model_and_data(o: dict):
    """The model, the dataset, the settings that identify a run on them (for resuming), and
    the calibration (images and `dsq.calibrate` options; None without --calib), whose images
    are left out of the dataset."""
    loaded = load_model(o["model"], o["arch"], o["trust_pickle"], o["checkpoint"])
    preset = preset_from(o, loaded.preset)
    dataset = dataset_from(o, preset)
    calibration, calib_settings = None, None
    if o.get("calib"):
        images, dataset = calibration_set(
            o["calib"], o["calib_images"], preset.transform(), dataset, progress=not o["quiet"]
        )
        calibration = (images, calib_config_from(o))
        calib_settings = {"folder": str(o["calib"]), "images": len(images), **calibration[1].to_dict()}
    click.echo(f"data: {dataset.describe()}", err=True)
    check_labels(dataset, loaded.num_classes)
    settings = {
        "model": o["model"],
        "arch": loaded.arch,
        "data": dataset.describe(),
        "limit": o["limit"],
        "preset": preset.to_dict(),
        "calibration": calib_settings,
    }
    return loaded, dataset, settings, calibration


def announce(run) -> None:
    """Have `run` say how many models it resumes from STEM.json, once it has checked them."""
    run.on_resume = lambda run: click.echo(
        f"resuming {run.path('json')}: {run.resumed} models already evaluated there", err=True
    )


def finish(run, plot) -> None:
    """Draw STEM.png with `plot` (a warning if matplotlib is missing) and say what was written."""
    written = [run.path("json"), run.path("csv")]
    try:
        plot(run, run.path("png"))
        written.append(run.path("png"))
    except DsqError as error:
        click.echo(f"warning: no plot: {error}", err=True)
    click.echo(f"wrote {', '.join(written)}")
