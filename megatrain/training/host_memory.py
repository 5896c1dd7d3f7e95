"""Keep freed host memory for reuse on a CPU run, as jemalloc or tcmalloc would.

glibc's malloc hands every block above its mmap threshold (at most 32 MB) to the kernel on
``free`` and maps fresh pages on the next ``malloc``: a CPU step that allocates its logits, their
gradient and the zeroed buffers of the backward (each tens of MB for a 4096-token micro-batch
over a 4096-token vocabulary) then pays a page fault per 4 KB page, every step, and runs
memory-bound kernels on cold pages. PyTorch's CPU allocator caches nothing, so the fix is
malloc's: no mmap'd blocks, and freed memory kept up to 2 GB above the heap's top. On the
quickstart this is ~20% more tokens/s (docs/benchmarks.md). The price: the process keeps the
peak of its heap (RSS ~10% higher there) instead of returning it between steps.

glibc only, CPU runs only (a GPU run's large blocks live in CUDA's caching allocator). Left alone
when the user tuned malloc through its environment (``MALLOC_MMAP_MAX_``,
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``) or preloads another allocator.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger("megatrain")

# <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
KEEP_BYTES = 2**31 - 1  # mallopt takes an int: freed memory above the heap's top kept up to this
_USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
                  "LD_PRELOAD")


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve large blocks from its heap and keep what is freed; True when
    applied (False: not glibc, or the user's own malloc settings stand)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    chosen = [name for name in _USER_SETTINGS if os.environ.get(name)]
    if chosen:
        log.info("host memory: malloc left as set by %s", ", ".join(chosen))
        return False
    libc = ctypes.CDLL(None)
    applied = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, KEEP_BYTES) == 1
    if applied:
        log.info("host memory: freed blocks kept for reuse (glibc mallopt)")
    else:
        log.warning("host memory: glibc refused mallopt; large CPU tensors stay mmap'd")
    return applied
