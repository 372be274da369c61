"""The benchmark's settings: the runtimes it knows, its defaults, their check, and the images' side."""

from __future__ import annotations

from ..errors import DsqError

RUNTIMES = ("float32", "simulate", "int", "int-fused", "torch-int8", "onnxruntime-float32", "onnxruntime-int8")
DEFAULT_BATCH_SIZES = (1, 32)
DEFAULT_REPEATS = 5
DEFAULT_WARMUP = 1
DEFAULT_SIDE = 32  # images of a preset that neither resizes nor crops (CIFAR-10's 32x32)
CALIBRATION_IMAGES = 8  # random images that torch-int8 and onnxruntime-int8 calibrate on by default


def check_settings(runtimes, batch_sizes, **counts: int) -> None:
    """DsqError for an unknown runtime, no batch size, or a batch size or count that is not a
    whole number of at least 1."""
    unknown = [name for name in runtimes if name not in RUNTIMES]
    if unknown or not runtimes:
        raise DsqError(f"unknown runtime {', '.join(unknown) or '(none given)'}: use some of {', '.join(RUNTIMES)}")
    if not batch_sizes:
        raise DsqError("no batch size given: give at least one, e.g. 1")
    for what, value in [*(("batch size", b) for b in batch_sizes), *counts.items()]:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DsqError(f"{what} must be a whole number of at least 1, got {value!r}")


def input_side(preset) -> int:
    """The side of the square images a model takes: its preset's crop, else its resize, else DEFAULT_SIDE."""
    return preset.crop or preset.resize or DEFAULT_SIDE
