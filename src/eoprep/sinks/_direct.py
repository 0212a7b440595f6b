"""Whole shard objects written past the page cache (``O_DIRECT``) on local file systems.

A buffered write copies the shard into page-cache pages the kernel must first find and clear; on
the 2-core development VM, whose fresh memory is slow to touch, that cost 2–4 ms of CPU per MB, as
much as a worker spent encoding it. With ``O_DIRECT`` the device reads the shard from the worker's
own (reused) buffer: ~0.3 ms of CPU per MB, the rest is waiting on the device while the other
workers compute. The output does not crowd the GDAL tiles of the inputs out of the page cache either.
The cost is that a write returns only once the device has the data, where a buffered one returns
at once: on a slow disk turn it off (``output.direct_io: false``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["write_direct"]

#: Offsets, lengths and buffer addresses of ``O_DIRECT`` I/O must be multiples of the device's logical
#: block size: 512 B or 4 KiB on current devices.
_ALIGN = 4096

_buffer: np.ndarray | None = None
#: Devices (``st_dev``) whose file system refused ``O_DIRECT``: written the buffered way from then on.
_refused: set[int] = set()


def write_direct(path: Path, parts: Sequence[bytes]) -> int | None:
    """Store the concatenation of ``parts`` at ``path``, replacing any file there in one step.

    Returns the bytes written, or None where ``O_DIRECT`` is not available (another platform, a file
    system that refuses it): the caller then writes the object the buffered way. Like zarr's local
    store, the data go to a ``.partial`` file beside ``path`` that is renamed over it once complete.
    """
    if not hasattr(os, "O_DIRECT"):
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.parent.stat().st_dev in _refused:
        return None
    size = sum(len(part) for part in parts)
    padded = -(-size // _ALIGN) * _ALIGN
    buffer = _aligned_buffer(padded)
    at = 0
    for part in parts:
        buffer[at : at + len(part)] = np.frombuffer(part, dtype=np.uint8)
        at += len(part)
    partial = path.with_suffix(f".{uuid.uuid4().hex}.partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_DIRECT, 0o666)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        _refused.add(path.parent.stat().st_dev)
        return None
    try:
        try:
            view, done = memoryview(buffer)[:padded], 0
            while done < padded:
                done += os.write(fd, view[done:])
            os.ftruncate(fd, size)  # the padding of the last block goes
        finally:
            os.close(fd)
        os.replace(partial, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            partial.unlink()
        if exc.errno != errno.EINVAL:
            raise
        _refused.add(path.parent.stat().st_dev)
        return None
    return size


def _aligned_buffer(size: int) -> np.ndarray:
    """This process's write buffer, aligned to `_ALIGN` and grown to ``size``; reused, so it is touched once.

    From the heap (a plain numpy array, its aligned part), not a mapping of its own: a Dask worker's heap
    is touched as it starts (`eoprep._malloc.pretouch_heap`), so a first shard does not fault in its buffer.
    """
    global _buffer
    if _buffer is None or len(_buffer) < size:
        _buffer = None  # the old one goes before the new one is allocated
        raw = np.empty(max(size, 32 * 2**20) + _ALIGN, dtype=np.uint8)
        skip = -raw.ctypes.data % _ALIGN
        _buffer = raw[skip : skip + len(raw) - _ALIGN]
    return _buffer
