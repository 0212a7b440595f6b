"""glibc malloc settings for processes that allocate chip-sized buffers over and over (Dask and DataLoader workers)."""

from __future__ import annotations

import ctypes
import resource

__all__ = ["pretouch_heap", "tune_malloc"]

#: mallopt's M_MMAP_THRESHOLD, M_TRIM_THRESHOLD and M_TOP_PAD. With glibc's defaults (and Dask's 64 KiB trim
#: threshold, which also pins the mmap threshold at 128 KiB) every chip-sized buffer is a fresh mapping whose
#: pages fault in again: about 400,000 page faults per 80 chips of 256² in one Dask worker (tasks 1.45x
#: slower), and half of a TACO DataLoader worker's page faults. With these, buffers up to 64 MiB come from the
#: heap, and up to 256 MiB of freed heap (a shard's or a batch's working set) stays for the next one. The top
#: pad is what keeps it in a thread's own arena (Dask runs tasks in a thread): glibc gives a non-main arena's
#: wholly free 64 MiB heaps back to the system unless the pad is larger, whatever the trim threshold.
_MALLOPT = {-3: 64 * 2**20, -1: 256 * 2**20, -2: 256 * 2**20}


def tune_malloc() -> bool:
    """Set `_MALLOPT` in this process; False where the C library has no ``mallopt`` (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in _MALLOPT.items())


def pretouch_heap(mb: int) -> int:
    """Allocate, write and free ``mb`` MB in 1 MB pieces from this thread's malloc arena; returns the page
    faults it took.

    Under `tune_malloc`'s thresholds the freed pieces stay in the arena, so the first chips a thread builds
    reuse resident pages: a Dask worker's first shard faulted in ~170 MB of fresh memory (GDAL's block
    cache, the shard's rows and chips), 0.1-0.3 s of a run, which a worker that touched them as it started
    no longer pays. Pointless without `tune_malloc` (the pieces would be mappings of their own, returned on free).
    """
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    pieces = [libc.malloc(2**20) for _ in range(mb)]
    for piece in pieces:
        if piece:
            ctypes.memset(piece, 0, 2**20)
    for piece in pieces:
        libc.free(piece)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
