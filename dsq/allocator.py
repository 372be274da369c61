"""Keep freed memory for reuse: CPU inference frees and allocates the same activation buffers
layer after layer, and glibc's malloc returns large ones to the operating system at once, so
every reuse pays a page fault per 4 KiB (ResNet-20 on one core: 1.6 ms per image instead of
2.7, docs/sweep.md). `reuse_freed_memory` raises its two thresholds; processes stay as large
as their peak use. It also caps malloc's arenas at two: each reserves 64 MiB of address space
per thread that ever allocated, which took a ResNet-20 quantize-and-evaluate run from 3.76 to
4.24 GB of address space (torch alone maps 3.26 GB), past the 4 GB that docs/robustness.md
promises; the run's time did not change measurably."""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
ARENAS = 2
MMAP_THRESHOLD_MAX = 32 << 20  # the largest glibc accepts on 64-bit systems
TRIM_THRESHOLD = 1 << 30


def reuse_freed_memory() -> bool:
    """Make glibc's malloc serve blocks of up to 32 MiB from its heap, keep up to 1 GiB freed and
    use at most ARENAS arenas; True where it did, False where libc is not glibc (nothing to do)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
        and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        and mallopt(M_ARENA_MAX, ARENAS)
    )
