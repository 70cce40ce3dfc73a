"""Host memory reuse for CPU steps: keep freed blocks in malloc's heap.

glibc's malloc maps every block above its mmap threshold (at most 32 MiB) fresh from the
kernel and unmaps it on free. A packed step of 8 `cifar` envs allocates activations and
gradients of 33 MiB (`[128, 64, 32, 32]` fp32) on every iteration, so each one comes back
as new pages that fault in on first touch: 4.7 million minor page faults in four epochs,
and the packed train step 1.6x slower than with the memory kept
(`docs/performance.md`). Every `MorphogeneticEnv` on a CPU calls `reuse_freed_memory`
when it is built (so every entry point, worker process and notebook gets it), and so does
the benchmark before it times anything.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 1 << 30
"""Free memory at the top of the heap above this is returned to the kernel."""


def reuse_freed_memory() -> bool:
    """Serve every allocation from malloc's heap (no per-block mmap) and keep up to 1 GiB
    of freed memory there for the next allocation. Process-wide, for the allocations made
    after the call; the process keeps its peak memory mapped, as PyTorch's CUDA caching
    allocator does on a GPU. Returns False (and changes nothing) where the C library is
    not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
