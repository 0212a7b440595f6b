"""PyTorch readers over eoprep outputs (Zarr store or TACO shards): map-style and streaming datasets.

`ChipDataset` (with `ChipSampler` for distributed ranks) and `ChipIterableDataset` return one dict
per chip with a tensor per collection group plus metadata; both split work shard by shard, shuffle
from ``(seed, epoch)``, select bands, apply a transform, filter by a geographic split
(`eoprep.splits`) and can join a feature store. `collate_chips` batches them for a DataLoader with
workers at a fraction of the default collate's hand-over cost. `as_torchgeo` wraps a dataset for TorchGeo.
"""

from __future__ import annotations

from eoprep.readers._collate import collate_chips
from eoprep.readers._datasets import ChipDataset, ChipIterableDataset, ChipSampler, epoch_order, partition
from eoprep.readers._sources import ChipRecord, ShardError, TacoSource, ZarrSource, open_source
from eoprep.readers._torchgeo import as_torchgeo

__all__ = [
    "ChipDataset",
    "ChipIterableDataset",
    "ChipRecord",
    "ChipSampler",
    "ShardError",
    "TacoSource",
    "ZarrSource",
    "as_torchgeo",
    "collate_chips",
    "epoch_order",
    "open_source",
    "partition",
]
