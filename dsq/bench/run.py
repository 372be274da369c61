"""The benchmark: build the runtimes, time them interleaved at each batch size, then measure their peak memory."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from .machine import machine
from .memory import measure_memory, save_runtimes
from .result import BenchResult, Measurement
from .runtimes import Runtime, Sources, attempt, build_runtimes
from .settings import (
    CALIBRATION_IMAGES,
    DEFAULT_BATCH_SIZES,
    DEFAULT_REPEATS,
    DEFAULT_WARMUP,
    RUNTIMES,
    check_settings,
)
from .timing import interleaved_seconds


def benchmark(
    model: nn.Module,
    qmodel: nn.Module,
    *,
    side: int,
    runtimes=RUNTIMES,
    batch_sizes=DEFAULT_BATCH_SIZES,
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    threads: int | None = None,
    calibration: torch.Tensor | None = None,
    memory: bool = True,
    progress: bool = False,
) -> BenchResult:
    """Images per second of `model` (float32) and its dsq model `qmodel` on `runtimes`, side by
    side: at each batch size, random side x side images, `warmup` untimed rounds over the
    runtimes (the first checks that each runs), then `repeats` timed rounds; with `memory`, each
    runtime's `peak_bytes` at each batch size. Both models are put in eval mode, and left so.

    `threads`: torch's and onnxruntime's (default: torch's now). `calibration`: images that
    torch-int8 and onnxruntime-int8 calibrate on (default: CALIBRATION_IMAGES random ones). A
    runtime that cannot be built or run here (onnxruntime not installed, a model torch's FX cannot
    trace) gets a one-line note in its rows. DsqError for bad settings.
    """
    threads = threads or torch.get_num_threads()
    check_settings(runtimes, batch_sizes, repeats=repeats, warmup=warmup, side=side, threads=threads)
    batch_sizes = sorted(set(batch_sizes))
    generator = torch.Generator().manual_seed(0)
    if calibration is None:
        calibration = torch.randn(CALIBRATION_IMAGES, 3, side, side, generator=generator)
    load_before, threads_before = os.getloadavg(), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="dsq-bench-") as folder:
            sources = Sources(model.eval(), qmodel.eval(), calibration, threads, Path(folder))
            built = build_runtimes(runtimes, sources, progress)
            files = save_runtimes(built, Path(folder)) if memory else {}
            rows = []
            for batch in batch_sizes:
                x = torch.randn(batch, 3, side, side, generator=generator)
                rows += time_batch(built, x, repeats, warmup, progress)
            if memory:
                measure_memory(rows, built, files, threads, side, progress)
    finally:
        torch.set_num_threads(threads_before)
    settings = {"side": side, "batch_sizes": batch_sizes, "repeats": repeats, "warmup": warmup, "threads": threads}
    load = {"load_average_before": load_before, "load_average_after": os.getloadavg()}
    return BenchResult(rows, {**settings, "runtimes": list(runtimes), "memory": memory}, {**machine(), **load})


def time_batch(
    built: dict[str, Runtime | str], x: torch.Tensor, repeats: int, warmup: int, progress: bool = False
) -> list[Measurement]:
    """Each runtime's Measurement on the batch `x`: the first warmup round checks that it runs."""
    rows = {name: Measurement(name, len(x)) for name in built}
    calls = {}
    for name, runtime in built.items():
        if isinstance(runtime, str):
            rows[name].note = runtime
            continue
        call = runtime.bind(x)
        failure = attempt(call)
        if isinstance(failure, str):
            rows[name].note = failure
        else:
            calls[name] = call
    desc = f"timing batch {len(x)}" if progress else None
    for name, seconds in interleaved_seconds(calls, repeats, warmup - 1, desc).items():
        rows[name].seconds = seconds
    return list(rows.values())
