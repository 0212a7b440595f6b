"""glibc malloc settings for processes that allocate chip-sized buffers over and over (Dask and DataLoader workers)."""

from __future__ import annotations

import ctypes

__all__ = ["tune_malloc"]

#: mallopt's M_MMAP_THRESHOLD and M_TRIM_THRESHOLD. With glibc's defaults (and Dask's 64 KiB trim threshold,
#: which also pins the mmap threshold at 128 KiB) every chip-sized buffer is a fresh mapping whose pages fault
#: in again: about 400,000 page faults per 80 chips of 256² in one Dask worker (tasks 1.45x slower), and half
#: of a TACO DataLoader worker's page faults. With these, buffers up to 64 MiB come from the heap, and up to
#: 256 MiB of freed heap (a shard's or a batch's working set) stays for the next one.
_MALLOPT = {-3: 64 * 2**20, -1: 256 * 2**20}


def tune_malloc() -> bool:
    """Set `_MALLOPT` in this process; False where the C library has no ``mallopt`` (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in _MALLOPT.items())
