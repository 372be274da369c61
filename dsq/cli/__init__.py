"""The command-line interface: thin click commands over the library.

`main`, the `dsq` console script, imports the commands (and torch: seconds) only when it runs,
inside its handler of Ctrl-C, with Ctrl-C held back until they end: an interrupted command ends in
one line and exit code 130 at any moment, never a traceback.
"""

from .interrupt import exit_interrupted, held_interrupts


def main():
    """The `dsq` console script (and `python -m dsq`)."""
    try:
        with held_interrupts():  # the commands' imports (torch, scipy) run to their end
            from .main import main as run_cli

        run_cli()
    except KeyboardInterrupt:
        exit_interrupted()


def __getattr__(name: str):
    """`cli`, the click group, imported on first use."""
    if name != "cli":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .main import cli

    return cli


__all__ = ["cli", "main"]
