"""Keep freed memory for reuse: CPU inference frees and allocates the same activation buffers
layer after layer, and glibc's malloc gives large ones back to the operating system at once, so
every reuse pays a page fault per 4 KiB (ResNet-20 on one core: 2.7 ms per image instead of
1.6, docs/sweep.md). Raising the mmap threshold is not enough: glibc caps it at 32 MiB, and an
ImageNet batch's activations are larger (EfficientNet-Lite0 at batch 64: up to 308 MB each),
which made `dsq eval` spend as much time in the kernel as in torch (docs/robustness.md).

`reuse_freed_memory` therefore serves every block from malloc's heap, never maps one on its
own, and never gives the heap's top back: a process stays as large as its peak use, as with
torch's CUDA caching allocator. It uses one arena: a second one maps its blocks over 64 MiB
on their own whatever the settings, and each arena reserves 64 MiB of address space per
thread that ever allocated, which kept ResNet-20 runs under the 4 GB that docs/robustness.md
promises."""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = (
    (M_MMAP_MAX, 0),  # no block is mapped on its own: all come from the heap
    (M_TRIM_THRESHOLD, -1),  # the heap's freed top is never given back (mallopt(3): -1 disables trimming)
    (M_ARENA_MAX, 1),
)


def reuse_freed_memory() -> bool:
    """Make glibc's malloc serve every block from one heap that keeps what is freed (SETTINGS);
    True where it did, False where libc is not glibc (nothing to do)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return all(mallopt(parameter, value) for parameter, value in SETTINGS)
