"""PyTorch datasets over an eoprep output: map-style, streaming, and the epoch plan they share.

Every epoch has one global order of chips: shards in a shuffled order, chips shuffled inside each
shard, both drawn from ``(seed, epoch)``. That order is cut into contiguous, balanced ranges, first
per distributed rank, then per DataLoader worker; the ranges tile the order, so in one epoch every
chip is read exactly once across all ranks and workers, and each worker touches few shards.

In a DataLoader worker process the datasets set glibc's malloc thresholds the way eoprep's Dask
workers do, so each sample's decode buffers reuse freed heap pages; the main process is left alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

from eoprep._malloc import tune_malloc
from eoprep.errors import EoprepError
from eoprep.readers._sources import ChipRecord, ShardError, names_store, names_taco_folder, open_source

__all__ = ["ChipDataset", "ChipIterableDataset", "ChipSampler", "epoch_order", "partition"]

Sample = dict[str, Any]


def epoch_order(shards: Sequence[str], *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Positions ``0..len(shards)-1`` in this epoch's order, chips of a shard kept together.

    Parameters
    ----------
    shards
        The shard of each chip, in the source's order (chips of one shard are consecutive or not).
    seed, epoch
        Seed the shuffle; the same pair gives the same order in every process.
    shuffle
        Without it, the source's order.

    Returns
    -------
    numpy.ndarray
        A permutation of ``range(len(shards))``.
    """
    n = len(shards)
    if not shuffle:
        return np.arange(n)
    rng = np.random.default_rng([seed, epoch])
    names, inverse = np.unique(np.asarray(shards, dtype=object), return_inverse=True)
    shard_rank = rng.permutation(len(names))[inverse]
    within = rng.random(n)
    return np.lexsort((within, shard_rank))


def partition(n: int, parts: int, index: int) -> slice:
    """The ``index``-th of ``parts`` contiguous ranges that tile ``range(n)``; sizes differ by at most one."""
    if not 0 <= index < parts:
        raise ValueError(f"part index {index} is outside 0..{parts - 1}")
    return slice(index * n // parts, (index + 1) * n // parts)


def _distributed(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        return rank, world_size
    if rank is not None or world_size is not None:
        raise ValueError("give both rank and world_size, or neither")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _ChipReader:
    """Options shared by both datasets: what to read and how a sample is built."""

    def __init__(
        self,
        path: str,
        *,
        format: Literal["auto", "zarr", "taco"] = "auto",
        groups: Sequence[str] | None = None,
        bands: Mapping[str, Sequence[str]] | None = None,
        split: str | None = None,
        splits: str | None = None,
        features: str | None = None,
        transform: Callable[[Sample], Sample] | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = str(path)
        self.source = open_source(self.path, format=format, storage_options=storage_options)
        self.groups = tuple(groups) if groups is not None else self.source.groups
        unknown = sorted(set(self.groups) - set(self.source.groups))
        if unknown:
            raise EoprepError(f"groups: {unknown} not in {self.source.url} (has {list(self.source.groups)})")
        self._band_index: dict[str, np.ndarray | None] = {}
        self.bands: dict[str, tuple[str, ...]] = {}
        for g in self.groups:
            stored = self.source.bands[g]
            wanted = tuple((bands or {}).get(g, stored))
            missing = [b for b in wanted if b not in stored]
            if missing:
                raise EoprepError(f"bands[{g!r}]: {missing} not in the output (has {list(stored)})")
            self.bands[g] = wanted
            self._band_index[g] = None if wanted == stored else np.array([stored.index(b) for b in wanted])
        records = self.source.records
        if split is not None:
            from eoprep.splits import read_splits

            table = read_splits(splits or _output_dir(self.path, self.source.url), storage_options=storage_options)
            if split not in set(table["split"]):
                raise EoprepError(f"split {split!r} is not in the splits table (has {sorted(set(table['split']))})")
            cells = set(table.loc[table["split"] == split, "cell"])
            records = [r for r in records if r.cell in cells]
        self.records: list[ChipRecord] = records
        self.features = _read_features(features, storage_options) if features else None
        if self.features is not None:
            lacking = [r.id for r in self.records if r.id not in self.features]
            if lacking:
                raise EoprepError(
                    f"features: {features} has no embedding for {len(lacking)} chip(s), e.g. {lacking[0]}; "
                    "run the embedding stage on this output first"
                )
        self.transform = transform

    @property
    def shards(self) -> list[str]:
        """The shard of each chip, in dataset order."""
        return [r.shard for r in self.records]

    def _sample(self, record: ChipRecord) -> Sample:
        _tune_worker()
        arrays = self.source.read(record, self.groups)
        pixels = {}
        for g in self.groups:
            idx = self._band_index[g]
            arr = arrays[g] if idx is None else np.take(arrays[g], idx, axis=1)
            pixels[g] = torch.from_numpy(np.ascontiguousarray(arr))
        sample: Sample = {
            "id": record.id,
            "cell": record.cell,
            "crs": record.crs,
            "transform": torch.tensor(record.transform, dtype=torch.float64),
            "pixels": pixels,
            "datetime": {g: torch.from_numpy(np.asarray(record.datetime[g])) for g in self.groups},
            "valid_fraction": {g: record.quality[g][0] for g in self.groups},
            "cloud_fraction": {g: record.quality[g][1] for g in self.groups},
        }
        if self.features is not None:
            sample["embedding"] = torch.from_numpy(self.features[record.id])
        return self.transform(sample) if self.transform is not None else sample


_worker_tuned = False


def _tune_worker() -> None:
    """In a DataLoader worker, once: malloc settings that let each sample's buffers reuse the last one's pages."""
    global _worker_tuned
    if not _worker_tuned and get_worker_info() is not None:
        tune_malloc()
        _worker_tuned = True


def _output_dir(path: str, source_url: str) -> str:
    url = source_url.rstrip("/")
    return url.rsplit("/", 1)[0] if names_store(url) or names_taco_folder(url) else path


def _read_features(path: str, storage_options: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
    """The feature-store hook: a (Geo)Parquet file with an ``id`` and an ``embedding`` (list of float) column."""
    import fsspec
    import pyarrow.parquet as pq

    try:
        with fsspec.open(path, "rb", **(storage_options or {})) as f:
            table = pq.read_table(f, columns=["id", "embedding"])
    except FileNotFoundError:
        raise EoprepError(f"features: {path} not found") from None
    except KeyError as exc:
        raise EoprepError(f"features: {path} needs columns 'id' and 'embedding' ({exc})") from None
    ids = [str(v) for v in table.column("id").to_pylist()]
    vectors = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    return dict(zip(ids, vectors, strict=True))


class ChipDataset(_ChipReader, Dataset):
    """Map-style dataset: ``dataset[i]`` is the ``i``-th written chip of an output.

    Parameters
    ----------
    path
        Output directory, its ``chips.zarr`` or its ``taco`` folder; a local path or an fsspec URL.
    format
        ``"zarr"``, ``"taco"`` or ``"auto"`` (from the path; Zarr when both exist).
    groups
        Collections (group keys such as ``"s2"``) to read; all by default.
    bands
        Per group, the bands to return and their order; all stored bands by default.
    split
        Keep only chips whose grid cell is in this split of ``splits`` (see `eoprep.splits`).
    splits
        The splits table; ``OUT/splits.parquet`` by default.
    features
        A (Geo)Parquet feature store with ``id`` (chip id) and ``embedding`` columns; adds
        ``sample["embedding"]``.
    transform
        Called on every sample dict; its result is returned.
    on_error
        ``"raise"``: a missing or corrupt shard raises `ShardError` naming it. ``"skip"``: shards
        are checked here and missing or truncated ones are left out, with a warning each.
    storage_options
        Passed to fsspec.

    Notes
    -----
    A sample is a dict: ``id``, ``cell``, ``crs`` (str), ``transform`` (6 GDAL geotransform values),
    ``pixels`` (group → tensor ``(time, band, y, x)``, raw stored values and dtype), ``datetime``
    (group → int64 microseconds since 1970, ``iinfo(int64).min`` for padded steps), ``valid_fraction``
    and ``cloud_fraction`` (group → float), and ``embedding`` when ``features`` is given.
    Use `ChipSampler` to split it across distributed ranks shard by shard.
    """

    def __init__(
        self,
        path: str,
        *,
        format: Literal["auto", "zarr", "taco"] = "auto",
        groups: Sequence[str] | None = None,
        bands: Mapping[str, Sequence[str]] | None = None,
        split: str | None = None,
        splits: str | None = None,
        features: str | None = None,
        transform: Callable[[Sample], Sample] | None = None,
        on_error: Literal["raise", "skip"] = "raise",
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            path,
            format=format,
            groups=groups,
            bands=bands,
            split=split,
            splits=splits,
            features=features,
            transform=transform,
            storage_options=storage_options,
        )
        if on_error == "skip":
            bad = set()
            for shard in dict.fromkeys(self.shards):
                try:
                    self.source.check_shard(shard)
                except ShardError as exc:
                    warnings.warn(f"skipping {exc}", stacklevel=2)
                    bad.add(shard)
            self.records = [r for r in self.records if r.shard not in bad]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        return self._sample(self.records[index])


class ChipSampler(Sampler[int]):
    """Indices of a `ChipDataset` for one distributed rank: shard-aware, shuffled from ``(seed, epoch)``.

    Parameters
    ----------
    dataset
        The dataset to sample.
    shuffle, seed
        Shuffle shards and chips within shards, the same way on every rank.
    rank, world_size
        This process's share; taken from ``torch.distributed`` when initialised, else ``0, 1``.

    Notes
    -----
    Call `set_epoch` before each epoch, as with ``DistributedSampler``. The ranks' index lists tile
    the dataset; their lengths differ by at most one.
    """

    def __init__(
        self,
        dataset: ChipDataset,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.shards = dataset.shards
        self.shuffle, self.seed = shuffle, seed
        self.rank, self.world_size = _distributed(rank, world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order `__iter__` yields."""
        self.epoch = epoch

    def _indices(self) -> np.ndarray:
        order = epoch_order(self.shards, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle)
        return order[partition(len(order), self.world_size, self.rank)]

    def __iter__(self) -> Iterator[int]:
        return iter(int(i) for i in self._indices())

    def __len__(self) -> int:
        part = partition(len(self.shards), self.world_size, self.rank)
        return part.stop - part.start


class ChipIterableDataset(_ChipReader, IterableDataset):
    """Streaming dataset: each DataLoader worker of each rank reads its own contiguous run of shards.

    Takes the parameters of `ChipDataset` (except ``on_error`` semantics, below) plus:

    Parameters
    ----------
    shuffle, seed
        Shuffle shards and chips within shards from ``(seed, epoch)``; call `set_epoch` each epoch.
    rank, world_size
        This process's share; taken from ``torch.distributed`` when initialised, else ``0, 1``.
    on_error
        ``"raise"``: a missing or corrupt shard raises `ShardError` naming it. ``"skip"``: the
        rest of that shard is skipped with a warning, the epoch goes on.

    Notes
    -----
    Per epoch, the ranks × workers streams tile the dataset: no chip is read twice or left out.
    Stream lengths differ by at most one chip.
    """

    def __init__(
        self,
        path: str,
        *,
        format: Literal["auto", "zarr", "taco"] = "auto",
        groups: Sequence[str] | None = None,
        bands: Mapping[str, Sequence[str]] | None = None,
        split: str | None = None,
        splits: str | None = None,
        features: str | None = None,
        transform: Callable[[Sample], Sample] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        on_error: Literal["raise", "skip"] = "raise",
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            path,
            format=format,
            groups=groups,
            bands=bands,
            split=split,
            splits=splits,
            features=features,
            transform=transform,
            storage_options=storage_options,
        )
        self.shuffle, self.seed, self.on_error = shuffle, seed, on_error
        self.rank, self.world_size = _distributed(rank, world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; workers started after this call (each epoch's iterator) see it."""
        self.epoch = epoch

    def plan(self, worker: int = 0, num_workers: int = 1) -> list[int]:
        """Dataset positions one worker of this rank reads this epoch, in order."""
        order = epoch_order(self.shards, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle)
        mine = order[partition(len(order), self.world_size, self.rank)]
        return [int(i) for i in mine[partition(len(mine), num_workers, worker)]]

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        skipped: set[str] = set()
        for i in self.plan(worker, num_workers):
            record = self.records[i]
            if record.shard in skipped:
                continue
            try:
                sample = self._sample(record)
            except ShardError as exc:
                if self.on_error != "skip":
                    raise
                warnings.warn(f"skipping the rest of a shard: {exc}", stacklevel=2)
                skipped.add(record.shard)
                continue
            yield sample

    def __len__(self) -> int:
        part = partition(len(self.records), self.world_size, self.rank)
        return part.stop - part.start
