"""Batching chip samples into one shared buffer, so a DataLoader worker hands a batch over in one piece.

PyTorch's default collate gives every stacked field of a batch its own shared-memory segment, and
the main process receives each segment as a separate file descriptor over a fresh authenticated
socket. A chip sample has about ten fields (pixels and dates per group, transform, quality), so
with worker processes that hand-over, not reading, limits a DataLoader. `collate_chips` stacks the
same fields into views of one buffer: one segment and one descriptor per batch.

A fresh segment per batch also means a page fault for every 4 KiB of it in the worker (a 12 MB
batch: ~2,800 faults, ~7 ms here, more than decoding it from Zarr). So each worker keeps a few
segments and refills one once the main process has dropped every tensor of the batch it carried:
the main process learns that from a weak reference to the batch's storage and raises the
segment's flag in a small array it shares with the worker. A segment is reused only after its
flag is raised; without the flags (a batch rebuilt into another container, a worker whose first
batches never arrived) every batch gets a fresh segment, as before.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import get_worker_info

from eoprep.ops import pid_alive

__all__ = ["collate_chips"]

_ALIGN = 64


@dataclass
class _Stack:
    """A field to stack: its per-sample tensors, or its per-sample numbers and their dtype."""

    tensors: list[torch.Tensor] | None = None
    numbers: list[bool | int | float] | None = None
    dtype: torch.dtype | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        if self.tensors is None:
            return (len(self.numbers or ()),)
        return (len(self.tensors), *self.tensors[0].shape)

    def build(self, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.tensors is not None:
            return torch.stack(self.tensors, out=out)
        numbers = torch.tensor(self.numbers, dtype=self.dtype)
        return numbers if out is None else out.copy_(numbers)


@dataclass(frozen=True)
class _Slot:
    """Where a stacked tensor goes back into the batch's nested layout."""

    index: int


def collate_chips(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack a list of samples into a batch, the layout of ``default_collate``, all tensors in one buffer.

    Parameters
    ----------
    samples
        Sample dicts as the eoprep datasets (or a transform) return them: nested mappings of tensors,
        numpy arrays and numbers are stacked along a new first axis; strings and anything else become
        lists.

    Returns
    -------
    dict
        The batch. In a DataLoader worker its tensors are views of one shared-memory buffer, which
        the worker refills for a later batch once the main process holds no tensor of this one
        (clone a tensor before handing it on to yet another process); in the main process each is
        its own tensor, as a single large buffer there only adds page faults.

    Raises
    ------
    ValueError
        When samples disagree on their keys or on a field's shape; the message names the field.

    Examples
    --------
    >>> loader = DataLoader(dataset, batch_size=8, num_workers=2, collate_fn=collate_chips)
    """
    if not samples:
        raise ValueError("collate_chips needs at least one sample")
    stacks: list[_Stack] = []
    layout = _plan(list(samples), "", stacks)
    if get_worker_info() is None or not stacks:
        return _fill(layout, [stack.build() for stack in stacks])
    offsets, size = [], 0
    for stack in stacks:
        offsets.append(size)
        size += -(-math.prod(stack.shape) * stack.dtype.itemsize // _ALIGN) * _ALIGN
    storage, lease = _worker_buffers().take(size)
    tensors = [
        stack.build(torch.empty(0, dtype=stack.dtype).set_(storage, offset // stack.dtype.itemsize, stack.shape))
        for stack, offset in zip(stacks, offsets, strict=True)
    ]
    return _LeasedBatch(_fill(layout, tensors), lease=lease)


#: Which worker's buffer a batch lives in: (worker pid, buffer index, the worker's flags until it saw one raised).
_Lease = tuple[int, int, torch.Tensor | None]


class _LeasedBatch(dict):
    """A batch built in a worker's reusable buffer; unpickled in another process it registers its lease there
    and becomes a plain dict."""

    def __init__(self, *args: Any, lease: _Lease | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lease = lease

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any], _Lease | None]]:
        return _received, (dict(self), self.lease)


class _BatchBuffers:
    """One DataLoader worker's shared-memory batch buffers and the flags the main process raises to free them.

    Six buffers cover the batches a worker has in flight with the default ``prefetch_factor`` of 2
    (queued, being built, held by the training loop, not yet seen released); when none is free the
    batch gets a fresh segment that is not kept.
    """

    def __init__(self, slots: int = 6) -> None:
        self.flags = torch.zeros(slots, dtype=torch.int32).share_memory_()
        self.storages: list[torch.UntypedStorage] = []
        self.flags_delivered = False
        self.pid = os.getpid()

    def take(self, size: int) -> tuple[torch.UntypedStorage, _Lease | None]:
        """A buffer of at least ``size`` bytes and the lease that frees it again, if it is one of ours."""
        pid = self.pid
        for i, storage in enumerate(self.storages):
            if int(self.flags[i]):
                self.flags[i] = 0
                self.flags_delivered = True
                if storage.nbytes() < size:
                    storage = self.storages[i] = torch.UntypedStorage._new_shared(size)
                return storage, (pid, i, None)
        storage = torch.UntypedStorage._new_shared(size)
        if len(self.storages) == len(self.flags):
            return storage, None
        self.storages.append(storage)
        return storage, (pid, len(self.storages) - 1, None if self.flags_delivered else self.flags)


_buffers: _BatchBuffers | None = None


def _worker_buffers() -> _BatchBuffers:
    global _buffers
    if _buffers is None or _buffers.pid != os.getpid():
        _buffers = _BatchBuffers()
    return _buffers


#: In the receiving process: each worker's flags (the latest a pid sent: pids get reused), and every buffer
#: of a batch still held here, with the flags of the worker that leased it.
_flags: dict[int, torch.Tensor] = {}
_held: list[tuple[torch.Tensor, int, StorageWeakRef]] = []
_leases_lock = threading.Lock()  # batches are unpickled by the DataLoader's iterator or its pin-memory thread


def _received(batch: dict[str, Any], lease: _Lease | None) -> dict[str, Any]:
    """Unpickle a batch: note its buffer as held, and raise the flag of every buffer no longer held."""
    if lease is None or lease[0] == os.getpid():
        return batch
    pid, slot, flags = lease
    tensor = _first_tensor(batch)
    with _leases_lock:
        if flags is not None:
            if pid not in _flags:
                for gone in [p for p in _flags if not pid_alive(p)]:
                    del _flags[gone]
            _flags[pid] = flags
        flags = _flags.get(pid)
        if flags is not None and tensor is not None:
            _held.append((flags, slot, StorageWeakRef(tensor.untyped_storage())))
        still = []
        for owner, index, ref in _held:
            if ref.expired():
                owner[index] = 1
            else:
                still.append((owner, index, ref))
        _held[:] = still
    return batch


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        return next((t for t in map(_first_tensor, value.values()) if t is not None), None)
    return None


def _plan(values: list[Any], key: str, stacks: list[_Stack]) -> Any:
    first = values[0]
    if isinstance(first, Mapping):
        keys = list(first)
        for value in values[1:]:
            if not isinstance(value, Mapping) or list(value) != keys:
                raise ValueError(f"samples differ in the keys of {key or 'the sample'!r}")
        return {k: _plan([v[k] for v in values], f"{key}.{k}" if key else str(k), stacks) for k in keys}
    stack = _stack(values)
    if stack is None:
        return list(values)
    if stack.tensors is not None:
        shapes = {t.shape for t in stack.tensors}
        if len(shapes) > 1 or len({t.dtype for t in stack.tensors}) > 1:
            raise ValueError(f"samples differ in the shape or dtype of {key!r}: {sorted(map(tuple, shapes))}")
        stack.dtype = stack.tensors[0].dtype
    stacks.append(stack)
    return _Slot(len(stacks) - 1)


def _stack(values: list[Any]) -> _Stack | None:
    """The field as a `_Stack` when its values stack the way ``default_collate`` stacks them, else None."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return _Stack(tensors=values) if all(isinstance(v, torch.Tensor) for v in values) else None
    if isinstance(first, np.ndarray) and first.dtype.kind in "biuf":
        return _Stack(tensors=[torch.from_numpy(np.asarray(v)) for v in values])
    if isinstance(first, bool | np.bool_):
        return _Stack(numbers=[bool(v) for v in values], dtype=torch.bool)
    if isinstance(first, float | np.floating):
        return _Stack(numbers=[float(v) for v in values], dtype=torch.float64)
    if isinstance(first, int | np.integer):
        return _Stack(numbers=[int(v) for v in values], dtype=torch.int64)
    return None


def _fill(layout: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(layout, _Slot):
        return tensors[layout.index]
    if isinstance(layout, dict):
        return {k: _fill(v, tensors) for k, v in layout.items()}
    return layout
