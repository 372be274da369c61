"""The machine a benchmark ran on: its CPU and the int8 units it has, its cores, torch's and onnxruntime's versions."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version

import torch

CPU_FLAGS = ("avx512bw", "avx512_vnni", "amx_int8")  # the integer units int8 speed depends on


def cpu_info() -> dict[str, str]:
    """The first processor's entries of /proc/cpuinfo ('model name', 'flags', ...); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n")[0]
    except OSError:
        return {}
    return {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first.splitlines())}


def machine() -> dict:
    """The CPU (its model and whether it has each of CPU_FLAGS), the cores, and torch's and
    onnxruntime's versions."""
    info = cpu_info()
    flags = set(info.get("flags", "").split())
    return {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS},
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onnxruntime": package_version("onnxruntime"),
    }


def package_version(name: str) -> str | None:
    """The installed version of a package, None where it is not installed."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None
