"""The `dsq` command group; user errors become one line and a non-zero exit."""
from __future__ import annotations

import click

from .. import __version__
from ..allocator import reuse_freed_memory
from ..distributed import main_process_speaks
from ..errors import DsqError
from .demo import demo_command
from .evaluate import eval_command
from .inspect import inspect_command
from .quantize import quantize_command
from .sensitivity import sensitivity_command
from .sweep import sweep_command


class DsqGroup(click.Group):
    def invoke(self, ctx):
        try:
            with main_process_speaks():
                return super().invoke(ctx)
        except DsqError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=DsqGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="dsq")
def cli():
    """dsq: DSConv post-training quantization of CNNs (low-bit VQK weights, KDS scales, BFP inputs)."""


for command in (quantize_command, eval_command, inspect_command, demo_command, sweep_command, sensitivity_command):
    cli.add_command(command)


def main():
    reuse_freed_memory()
    cli(prog_name="dsq")
