"""`dsq inspect`: the recipe, per-layer sizes and whole-file size accounting of a dsq file."""

from __future__ import annotations

import click

from .. import artifact, report
from ..fileio import write_json
from .options import InputPath, OutputFile, pass_options


@click.command("inspect")
@click.argument("file", type=InputPath(dir_okay=False))
@click.option("--json", "json_path", type=OutputFile(), help="Write the recipe and sizes as JSON here.")
@pass_options
def inspect_command(o):
    """Show how FILE (a quantized dsq model) was made and what each layer takes in it."""
    file, json_path = o["file"], o["json_path"]
    recipe, sizes = artifact.read_recipe(file), artifact.file_sizes(file)
    click.echo(report.recipe_summary(recipe))
    click.echo()
    click.echo(report.size_table(sizes))
    click.echo()
    click.echo(report.size_summary(sizes))
    if json_path:
        write_json(json_path, {"file": str(file), "recipe": recipe, "sizes": sizes.to_dict()})
        click.echo(f"wrote {json_path}")
