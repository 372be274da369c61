"""Images per second of a float CNN and its dsq model on several CPU runtimes, side by side in one
run, with the peak memory each runtime takes (`dsq bench`; docs/bench.md).

Time: round robin over the runtimes (a, b, c, a, b, c, ...), `repeats` timed rounds after
`warmup` untimed ones, the median per runtime, so that load drifts hit all alike (`timing`).
Memory: each runtime at each batch size in a fresh Python process of its own (`memory`).

    from dsq.bench import benchmark
    result = benchmark(model, qmodel, side=224, batch_sizes=(1, 32))
    print(dsq.report.bench_table(result))

Modules: `settings` (runtime names, defaults, their check), `timing`, `machine`, `baselines`
(torch's and onnxruntime's int8 models, the float ONNX file), `runtimes` (what each runtime runs
and how it is built), `memory`, `result` (BenchResult) and `run` (`benchmark`).
"""

from .baselines import CalibrationImages, export_float_onnx, onnx_int8, quantized_engine, torch_int8
from .machine import CPU_FLAGS, cpu_info, machine, package_version
from .memory import (
    load_runtime,
    measure_memory,
    peak_bytes,
    print_peak_bytes,
    proc_status_bytes,
    reset_peak_rss,
    save_runtimes,
)
from .result import BenchResult, Measurement
from .run import benchmark, time_batch
from .runtimes import (
    BUILDERS,
    NO_SPINNING,
    OnnxRuntime,
    Runtime,
    Sources,
    TorchRuntime,
    TracedRuntime,
    attempt,
    backend_copy,
    build_runtimes,
    dequantized_float,
    onnx_session,
)
from .settings import (
    CALIBRATION_IMAGES,
    DEFAULT_BATCH_SIZES,
    DEFAULT_REPEATS,
    DEFAULT_SIDE,
    DEFAULT_WARMUP,
    RUNTIMES,
    check_settings,
    input_side,
)
from .timing import interleaved_seconds, interleaved_times

__all__ = [
    "BUILDERS",
    "CALIBRATION_IMAGES",
    "CPU_FLAGS",
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_REPEATS",
    "DEFAULT_SIDE",
    "DEFAULT_WARMUP",
    "NO_SPINNING",
    "RUNTIMES",
    "BenchResult",
    "CalibrationImages",
    "Measurement",
    "OnnxRuntime",
    "Runtime",
    "Sources",
    "TorchRuntime",
    "TracedRuntime",
    "attempt",
    "backend_copy",
    "benchmark",
    "build_runtimes",
    "check_settings",
    "cpu_info",
    "dequantized_float",
    "export_float_onnx",
    "input_side",
    "interleaved_seconds",
    "interleaved_times",
    "load_runtime",
    "machine",
    "measure_memory",
    "onnx_int8",
    "onnx_session",
    "package_version",
    "peak_bytes",
    "print_peak_bytes",
    "proc_status_bytes",
    "quantized_engine",
    "reset_peak_rss",
    "save_runtimes",
    "time_batch",
    "torch_int8",
]
