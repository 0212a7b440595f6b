"""Sinks: where chips are written (Zarr v3 shards) and the side files that describe them."""

from __future__ import annotations

from eoprep.sinks._index import INDEX_FILE, STAC_DIR, read_index, write_index, write_manifest, write_stac
from eoprep.sinks._zarr import CHIPS_STORE, ChipStore, ShardSlice

__all__ = [
    "CHIPS_STORE",
    "INDEX_FILE",
    "STAC_DIR",
    "ChipStore",
    "ShardSlice",
    "read_index",
    "write_index",
    "write_manifest",
    "write_stac",
]
