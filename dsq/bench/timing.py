"""Interleaved timing: callables called in turn (a, b, a, b, ...), so that load drifts hit all alike."""

from __future__ import annotations

import statistics
import time
from typing import Callable

from tqdm.auto import tqdm


def interleaved_seconds(
    fns: dict[str, Callable], repeats: int, warmup: int = 1, desc: str | None = None
) -> dict[str, list[float]]:
    """Seconds of each of `repeats` calls of each callable, called in turn (a, b, a, b, ...) after
    `warmup` untimed rounds, so that load drifts hit all alike; `desc` labels a progress bar."""
    seconds = {name: [] for name in fns}
    with tqdm(total=(warmup + repeats) * len(fns), desc=desc, unit="call", disable=desc is None) as bar:
        for round_ in range(warmup + repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                if round_ >= warmup:
                    seconds[name].append(time.perf_counter() - start)
                bar.update()
    return seconds


def interleaved_times(fns: dict[str, Callable], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each callable, timed as `interleaved_seconds` does."""
    return {name: statistics.median(s) for name, s in interleaved_seconds(fns, repeats, warmup).items()}
