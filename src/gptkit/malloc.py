"""glibc's malloc, told to keep freed memory for reuse (CPU training).

PyTorch's CPU tensors come from malloc. glibc hands a block of 128 KB or more back to the
operating system when it is freed (unmapped, or trimmed from the top of the heap), so the
next step's activations of the same sizes arrive as fresh pages, each one faulted in and
zeroed by the kernel on first write: about 800 page faults per training step of the
Shakespeare benchmark's model (3 MB), 1-2 ms of a 35 ms step on the dev machine (measured
with getrusage; benchmarks/RESULTS.md). Raising the two thresholds keeps that memory in the
process, where the next step reuses it: no faults after the first steps. The process then
holds on to its peak memory, as PyTorch's GPU caching allocator does.

    >>> keep_freed_memory()  # True where glibc accepted both settings

Only glibc has `mallopt`; elsewhere (macOS, musl) this returns False and changes nothing.
"""

from __future__ import annotations

import ctypes
import functools
import sys

# <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks above this are still mapped and unmapped one by one: 32 MB, the ceiling glibc
# itself puts on its dynamic threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX).
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of free memory at the top of the heap


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds once per process; True if both took."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
