import platform
import subprocess
import sys

import pytest

from dsq.allocator import reuse_freed_memory

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")

# Allocates, fills and frees a 100 MiB block (over glibc's 32 MiB mmap cap and a second arena's
# 64 MiB heaps) in a new thread each time, and prints the page faults of the last two times.
REUSE = """
import ctypes, resource, sys, threading
from dsq.allocator import reuse_freed_memory
if sys.argv[1] == "reuse":
    reuse_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
SIZE = 100 << 20

def use_a_block():
    block = libc.malloc(SIZE)
    libc.memset(block, 1, SIZE)
    libc.free(block)

def in_a_thread():
    thread = threading.Thread(target=use_a_block)
    thread.start()
    thread.join()

in_a_thread()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
in_a_thread()
in_a_thread()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = 2 * (100 << 20) // 4096  # faults of two uses of a block that comes back from the system each time


def test_reuse_freed_memory_where_libc_is_glibc():
    assert reuse_freed_memory() is (platform.libc_ver()[0] == "glibc")


@glibc
@pytest.mark.parametrize("malloc", ["default", "reuse"])
def test_freed_large_blocks_are_reused_without_page_faults(malloc):
    """glibc maps a block this large on its own and unmaps it when freed, so every use faults in
    every page; with the settings the block stays in the heap and its pages stay mapped."""
    done = subprocess.run([sys.executable, "-c", REUSE, malloc], capture_output=True, text=True, check=True)
    faults = int(done.stdout)
    if malloc == "reuse":
        assert faults < PAGES // 20
    else:
        assert faults > PAGES // 2  # what the settings avoid (the test can tell)
