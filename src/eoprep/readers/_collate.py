"""Batching chip samples into one shared buffer, so a DataLoader worker hands a batch over in one piece.

PyTorch's default collate gives every stacked field of a batch its own shared-memory segment, and
the main process receives each segment as a separate file descriptor over a fresh authenticated
socket. A chip sample has about ten fields (pixels and dates per group, transform, quality), so
with worker processes that hand-over, not reading, limits a DataLoader. `collate_chips` stacks the
same fields into views of one buffer: one segment and one descriptor per batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

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
        The batch. In a DataLoader worker its tensors are views of one shared-memory buffer; in the
        main process each is its own tensor, as a single large buffer there only adds page faults.

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
    storage = torch.UntypedStorage._new_shared(size)
    tensors = [
        stack.build(torch.empty(0, dtype=stack.dtype).set_(storage, offset // stack.dtype.itemsize, stack.shape))
        for stack, offset in zip(stacks, offsets, strict=True)
    ]
    return _fill(layout, tensors)


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
