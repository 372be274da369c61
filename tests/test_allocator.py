import platform

from dsq.allocator import reuse_freed_memory


def test_reuse_freed_memory_where_libc_is_glibc():
    assert reuse_freed_memory() is (platform.libc_ver()[0] == "glibc")
