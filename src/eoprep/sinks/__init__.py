"""Sinks: where chips are written (Zarr v3 shards, TACO shards) and the side files that describe them."""

from __future__ import annotations

from eoprep.sinks._index import (
    INDEX_FILE,
    STAC_DIR,
    atomic_write,
    read_index,
    write_index,
    write_manifest,
    write_stac,
)
from eoprep.sinks._taco import TACO_DIR, TacoWriteResult, write_taco
from eoprep.sinks._zarr import (
    CHIPS_STORE,
    ChipState,
    ChipStore,
    ShardSlice,
    ShardWriter,
    consecutive_runs,
    shard_slices,
)

__all__ = [
    "CHIPS_STORE",
    "INDEX_FILE",
    "STAC_DIR",
    "TACO_DIR",
    "ChipState",
    "ChipStore",
    "ShardSlice",
    "ShardWriter",
    "TacoWriteResult",
    "atomic_write",
    "consecutive_runs",
    "read_index",
    "shard_slices",
    "write_index",
    "write_manifest",
    "write_stac",
    "write_taco",
]
