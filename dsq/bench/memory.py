"""Peak memory: each runtime saved to a file, then loaded and run once in a fresh Python process
that reports the growth of its resident set (Linux /proc)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import DsqError
from .result import Measurement
from .runtimes import OnnxRuntime, Runtime, TorchRuntime, attempt

CHILD = "import sys; from dsq.bench.memory import print_peak_bytes; print_peak_bytes(*sys.argv[1:])"


def peak_bytes(kind: str, path: Path, threads: int, batch: int, side: int) -> int:
    """The runtime's peak memory: in a fresh Python process, the growth of the resident set from
    just before it loads the runtime saved at `path` (`kind`: TorchRuntime.kind and its kin) to
    its high-water mark while it runs once on a batch of `batch` random side x side images."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, sys.path))}  # to unpickle the model's classes
    command = [sys.executable, "-c", CHILD, *map(str, [kind, path, threads, batch, side])]
    child = subprocess.run(command, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    if child.returncode != 0:
        lines = child.stderr.strip().splitlines() or [f"exit status {child.returncode}"]
        raise DsqError(f"the memory probe failed: {lines[-1]}")
    return int(child.stdout.split()[-1])


def print_peak_bytes(kind: str, path: str, threads: str, batch: str, side: str) -> None:
    """`peak_bytes`' child process: prints the bytes."""
    torch.set_num_threads(int(threads))
    if kind == "onnx":
        import onnxruntime  # noqa: F401 - loaded before the baseline: its code is not the model's memory
    x = torch.randn(int(batch), 3, int(side), int(side))
    before = reset_peak_rss()
    load_runtime(kind, Path(path), int(threads)).bind(x)()
    print(proc_status_bytes("VmHWM") - before)


def load_runtime(kind: str, path: Path, threads: int) -> Runtime:
    """The runtime that `to_file` saved at `path`."""
    if kind == "onnx":
        return OnnxRuntime(path, threads)
    if kind == "torchscript":
        return TorchRuntime(torch.jit.load(path))
    return TorchRuntime(torch.load(path, weights_only=False))  # our own file, written by to_file


def reset_peak_rss() -> int:
    """Set this process's resident high-water mark to its resident set now (Linux: clear_refs),
    and return that, in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return proc_status_bytes("VmRSS")


def proc_status_bytes(key: str) -> int:
    """A kB entry of /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        return 1024 * int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1))


def save_runtimes(built: dict[str, Runtime | str], folder: Path) -> dict[str, Path | str]:
    """Where each built runtime is saved for `peak_bytes` (as built: before it ran), or why it could not be."""
    return {
        name: attempt(runtime.to_file, folder / f"{name}.pt")
        for name, runtime in built.items()
        if not isinstance(runtime, str)
    }


def measure_memory(
    rows: list[Measurement], built: dict, files: dict, threads: int, side: int, progress: bool = False
) -> None:
    """Fill in the peak memory of each row that ran (or the note why not)."""
    for row in tqdm([r for r in rows if r.seconds], desc="peak memory", unit="run", disable=not progress):
        file, kind = files[row.runtime], built[row.runtime].kind
        peak = file if isinstance(file, str) else attempt(peak_bytes, kind, file, threads, row.batch, side)
        if isinstance(peak, str):
            row.note = f"peak memory not measured: {peak}"
        else:
            row.peak_bytes = peak
