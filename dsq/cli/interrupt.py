"""Ctrl-C as a command-line tool should end: one line, exit code 130, never a traceback."""

import sys

INTERRUPTED = 130  # 128 + SIGINT: what shells report for a command stopped by Ctrl-C


def exit_interrupted():
    """End the process as Ctrl-C should: one line, exit code 130 (files being written are removed
    on the way out, by their own handlers)."""
    print("Error: interrupted", file=sys.stderr)
    sys.exit(INTERRUPTED)
