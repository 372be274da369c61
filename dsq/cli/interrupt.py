"""Ctrl-C as a command-line tool should end: one line, exit code 130, never a traceback."""

import signal
import sys
from contextlib import contextmanager

INTERRUPTED = 130  # 128 + SIGINT: what shells report for a command stopped by Ctrl-C


def exit_interrupted():
    """End the process as Ctrl-C should: one line, exit code 130 (files being written are removed
    on the way out, by their own handlers)."""
    print("Error: interrupted", file=sys.stderr)
    sys.exit(INTERRUPTED)


@contextmanager
def held_interrupts():
    """Ctrl-C held back until the block ends, then acted on as one line: inside a third-party
    import, a KeyboardInterrupt can leave a module half-imported, and the next access to it fail
    with another error (numpy's `__getattr__` recursing without end) that is no longer Ctrl-C."""
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        exit_interrupted()
