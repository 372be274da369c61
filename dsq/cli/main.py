"""The `dsq` command group: user errors, failed file operations and Ctrl-C become one line and a
non-zero exit (130 for Ctrl-C), never a traceback; the library's warnings become `warning: ...`
lines on stderr, each said once."""

from __future__ import annotations

import contextlib
import warnings

import click

from .._version import __version__
from ..allocator import reuse_freed_memory
from ..distributed import main_process_speaks
from ..errors import DsqError, DsqWarning, os_reason
from .bench import bench_command
from .demo import demo_command
from .evaluate import eval_command
from .export import export_command
from .inspect import inspect_command
from .interrupt import exit_interrupted
from .quantize import quantize_command
from .sensitivity import sensitivity_command
from .sweep import sweep_command


class DsqGroup(click.Group):
    def invoke(self, ctx):
        try:
            with main_process_speaks(), warnings_as_lines():
                return super().invoke(ctx)
        except DsqError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:  # the last resort: e.g. an input that may not be read
            raise click.ClickException(describe_os_error(e)) from None
        except KeyboardInterrupt:
            exit_interrupted()


@contextlib.contextmanager
def warnings_as_lines():
    """Show each distinct DsqWarning once, as one `warning: ...` line on stderr."""
    shown = warnings.showwarning

    def show(message, category, *args, **kwargs):
        if issubclass(category, DsqWarning):
            click.echo(f"warning: {message}", err=True)
        else:
            shown(message, category, *args, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("once", DsqWarning)
        warnings.showwarning = show
        yield


def describe_os_error(error: OSError) -> str:
    """'FILE: reason' (one line) for a failed file operation."""
    reason = os_reason(error)
    return f"{error.filename}: {reason}" if error.filename else reason


@click.group(cls=DsqGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="dsq")
def cli():
    """dsq: DSConv post-training quantization of CNNs (low-bit VQK weights, KDS scales, BFP inputs)."""


COMMANDS = (
    quantize_command,
    eval_command,
    export_command,
    inspect_command,
    demo_command,
    sweep_command,
    sensitivity_command,
    bench_command,
)
for command in COMMANDS:
    cli.add_command(command)


def main():
    reuse_freed_memory()
    cli(prog_name="dsq")
