"""Chip sources: the Zarr store and the TACO shards of an output, behind one small interface.

A source lists the written chips once (``records``) and reads one chip's pixels on demand. It keeps
only URLs when pickled, so DataLoader workers and distributed ranks open their own file handles.
Each chip belongs to one shard (a Zarr shard object or a ``.tacozip`` file): the unit that readers
split across workers, check before reading and name in errors.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import fsspec
import imagecodecs
import numpy as np
import pyarrow.parquet as pq

from eoprep.errors import EoprepError
from eoprep.readers._geotiff import decode_geotiff
from eoprep.shard_format import ShardFormat

__all__ = ["ChipRecord", "ChipSource", "ShardError", "TacoSource", "ZarrSource", "open_source"]

_NAT = np.iinfo(np.int64).min


class ShardError(EoprepError):
    """A shard that is missing, truncated or does not decode; the message names it."""


@dataclass(frozen=True)
class ChipRecord:
    """One written chip: where it lives and what a reader returns besides pixels."""

    id: str
    cell: str
    crs: str
    transform: tuple[float, ...]
    shard: str
    position: int
    datetime: Mapping[str, np.ndarray] = field(compare=False, repr=False)
    quality: Mapping[str, tuple[float, float]] = field(compare=False, repr=False)


class ChipSource(Protocol):
    """What the datasets need from an output format."""

    url: str
    groups: tuple[str, ...]
    bands: Mapping[str, tuple[str, ...]]
    records: list[ChipRecord]

    def check_shard(self, shard: str) -> None:
        """Raise `ShardError` if ``shard`` is missing or truncated."""

    def read(self, record: ChipRecord, groups: Sequence[str]) -> dict[str, np.ndarray]:
        """Pixels ``(time, band, y, x)`` of one chip for each of ``groups``, as stored."""


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def _micros(values: np.ndarray) -> np.ndarray:
    out = values.astype("datetime64[us]").astype(np.int64)
    out[np.isnat(values)] = _NAT
    return out


class _Source:
    """Shared pickling and shard-check bookkeeping: handles are per process, never pickled."""

    url: str
    storage_options: dict[str, Any]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        state["_checked"] = set()
        return state

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        handles = self.__dict__.setdefault("_handles", {})
        if "fs" not in handles:
            handles["fs"], handles["root"] = fsspec.core.url_to_fs(self.url, **self.storage_options)
        return handles["fs"]

    @property
    def root(self) -> str:
        self.fs  # noqa: B018 - opens the filesystem and resolves the root path
        return self.__dict__["_handles"]["root"]

    def _checked_once(self, shard: str) -> bool:
        checked = self.__dict__.setdefault("_checked", set())
        if shard in checked:
            return True
        checked.add(shard)
        return False


class ZarrSource(_Source):
    """The ``chips.zarr`` store of an output: one group per collection, chips along the first axis.

    A shard is one shard object of the pixel arrays (``chips_per_shard`` consecutive chips). Zarr
    returns fill values for a shard object that is absent, so absence is checked before reading.
    """

    def __init__(self, url: str, *, storage_options: Mapping[str, Any] | None = None) -> None:
        import zarr

        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        try:
            root = zarr.open_group(self.url, mode="r", storage_options=self.storage_options or None)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            raise EoprepError(f"{self.url}: no Zarr chip store here; point at an eoprep output directory") from None
        self.groups = tuple(sorted(root.group_keys()))
        if not self.groups:
            raise EoprepError(f"{self.url}: the Zarr store has no collection groups")
        first = root[self.groups[0]]
        self.chips_per_shard = int((first["pixels"].shards or first["pixels"].chunks)[0])
        self.bands = {g: tuple(str(b) for b in root[f"{g}/band"][:]) for g in self.groups}
        ids = [str(v) for v in first["chip"][:]]
        cells = [str(v) for v in first["cell"][:]]
        crs = [str(v) for v in first["crs"][:]]
        transform = first["transform"][:]
        written = np.logical_and.reduce([np.asarray(root[f"{g}/written"][:], dtype=bool) for g in self.groups])
        times = {g: _micros(_decode_times(root[f"{g}/datetime"])) for g in self.groups}
        quality = {g: (root[f"{g}/valid_fraction"][:], root[f"{g}/cloud_fraction"][:]) for g in self.groups}
        pixels = {g: root[f"{g}/pixels"] for g in self.groups}
        self._formats = {g: ShardFormat.from_metadata(a.metadata.to_dict(), a.fill_value) for g, a in pixels.items()}
        self.records = [
            ChipRecord(
                id=ids[i],
                cell=cells[i],
                crs=crs[i],
                transform=tuple(float(v) for v in transform[i]),
                shard=self._shard_name(i),
                position=i,
                datetime={g: times[g][i] for g in self.groups},
                quality={g: (float(quality[g][0][i]), float(quality[g][1][i])) for g in self.groups},
            )
            for i in np.flatnonzero(written)
        ]

    def _shard_name(self, position: int) -> str:
        return f"chips.zarr/*/pixels/c/{position // self.chips_per_shard}/0/0/0/0"

    def _shard_keys(self, shard: str) -> list[str]:
        index = shard.split("/")[4]
        return [f"{g}/pixels/c/{index}/0/0/0/0" for g in self.groups]

    def _array(self, group: str) -> Any:
        import zarr

        handles = self.__dict__.setdefault("_handles", {})
        key = f"array:{group}"
        if key not in handles:
            handles[key] = zarr.open_array(
                self.url, path=f"{group}/pixels", mode="r", storage_options=self.storage_options or None
            )
        return handles[key]

    def check_shard(self, shard: str) -> None:
        if self._checked_once(shard):
            return
        for key in self._shard_keys(shard):
            path = _join(self.root, key)
            if not self.fs.exists(path):
                raise ShardError(
                    f"shard {_join(self.url, key)} is missing: its chips are recorded as written, so reading would "
                    "return fill values. Re-run the pipeline on a fresh output, or restore the file."
                )

    def read(self, record: ChipRecord, groups: Sequence[str]) -> dict[str, np.ndarray]:
        self.check_shard(record.shard)
        keys = dict(zip(self.groups, self._shard_keys(record.shard), strict=True))
        out = {}
        for g in groups:
            try:
                fmt = self._formats[g]
                if fmt is None:
                    out[g] = np.asarray(self._array(g)[record.position])
                else:
                    out[g] = self._read_inner(fmt, keys[g], record.position % fmt.chips)
            except Exception as exc:
                raise ShardError(
                    f"shard {_join(self.url, keys[g])} does not decode (chip {record.id}): {type(exc).__name__}: {exc}"
                ) from None
        return out

    def _read_inner(self, fmt: ShardFormat, key: str, index: int) -> np.ndarray:
        """One chip straight from its shard object: a cached shard index, one ranged read, one decode."""
        path = _join(self.root, key)
        indexes = self.__dict__.setdefault("_handles", {}).setdefault("indexes", {})
        if key not in indexes:
            indexes[key] = fmt.shard_index(self.fs.cat_file(path, start=-fmt.index_nbytes))
        out = np.empty((1, *fmt.shape), dtype=fmt.dtype)
        fmt.read_chips(self.fs, path, [index], out, index=indexes[key])
        return out[0]


def _decode_times(arr: Any) -> np.ndarray:
    raw = arr[:]
    if np.issubdtype(raw.dtype, np.datetime64):
        return raw.astype("datetime64[ns]")
    units = str(arr.attrs.get("units", "microseconds since 1970-01-01"))
    if not units.startswith("microseconds since 1970-01-01"):
        raise EoprepError(f"{arr.path}: unexpected time units {units!r}")
    out = raw.astype("datetime64[us]")
    out[raw == arr.attrs.get("_FillValue", _NAT)] = np.datetime64("NaT")
    out[raw == _NAT] = np.datetime64("NaT")
    return out


@dataclass(frozen=True)
class _Payload:
    offset: int
    size: int
    crc32: int
    shape: tuple[int, ...]


class TacoSource(_Source):
    """The ``.tacozip`` shards of an output, listed by their consolidated ``.tacocat`` metadata.

    Payloads are read with one ranged request each and checked against the CRC32 recorded at
    write time, so a corrupt shard raises instead of yielding wrong pixels. They are decoded without
    GDAL when laid out as the TACO sink writes them (`decode_geotiff`), through rasterio otherwise.
    """

    def __init__(self, url: str, *, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        level0 = self._table("level0.parquet")
        level1 = self._table("level1.parquet")
        self.groups = tuple(sorted(dict.fromkeys(level1["id"])))
        self.bands = {}
        self._payloads: dict[tuple[str, str], _Payload] = {}
        self._min_size: dict[str, int] = {}
        children: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
        for row in level1.to_dict("records"):
            shard, group = row["internal:source_file"], row["id"]
            children.setdefault((shard, int(row["internal:parent_id"])), {})[group] = row
            self.bands.setdefault(group, tuple(json.loads(row["eoprep:bands"])))
            end = int(row["internal:offset"]) + int(row["internal:size"])
            self._min_size[shard] = max(self._min_size.get(shard, 0), end)
        self.records = []
        for row in level0.to_dict("records"):
            shard = row["internal:source_file"]
            kids = children.get((shard, int(row["internal:current_id"])), {})
            if set(kids) != set(self.groups):
                raise EoprepError(
                    f"{self.url}: chip {row['id']} in {shard} lacks groups {set(self.groups) - set(kids)}"
                )
            for g, kid in kids.items():
                self._payloads[(row["id"], g)] = _Payload(
                    int(kid["internal:offset"]),
                    int(kid["internal:size"]),
                    int(kid["eoprep:crc32"]),
                    tuple(int(n) for n in kid["stac:tensor_shape"]),
                )
            self.records.append(
                ChipRecord(
                    id=str(row["id"]),
                    cell=str(row["eoprep:cell"]),
                    crs=str(row["stac:crs"]),
                    transform=tuple(float(v) for v in row["stac:geotransform"]),
                    shard=str(shard),
                    position=int(row["eoprep:zarr_index"]),
                    datetime={g: _taco_times(kids[g]) for g in self.groups},
                    quality={
                        g: (float(kids[g]["eoprep:valid_fraction"]), float(kids[g]["eoprep:cloud_fraction"]))
                        for g in self.groups
                    },
                )
            )
        self.records.sort(key=lambda r: (r.shard, r.position))

    def _table(self, name: str) -> Any:
        path = _join(self.root, ".tacocat", name)
        try:
            with self.fs.open(path, "rb") as f:
                return pq.read_table(f).to_pandas()
        except FileNotFoundError:
            raise EoprepError(
                f"{_join(self.url, '.tacocat', name)} not found: TACO shards are listed by their .tacocat; "
                "write the output with `output.format: taco`"
            ) from None

    def check_shard(self, shard: str) -> None:
        if self._checked_once(shard):
            return
        path = _join(self.root, shard)
        try:
            size = self.fs.size(path)
        except FileNotFoundError:
            raise ShardError(f"shard {_join(self.url, shard)} is missing (listed in .tacocat)") from None
        if size < self._min_size[shard]:
            raise ShardError(
                f"shard {_join(self.url, shard)} is truncated: {size} bytes, its samples end at byte "
                f"{self._min_size[shard]}. Restore the file or rewrite the TACO output."
            )

    def read(self, record: ChipRecord, groups: Sequence[str]) -> dict[str, np.ndarray]:
        self.check_shard(record.shard)
        path = _join(self.root, record.shard)
        out = {}
        for g in groups:
            p = self._payloads[(record.id, g)]
            data = self.fs.cat_file(path, start=p.offset, end=p.offset + p.size)
            # imagecodecs' CRC32 is zlib's value, computed about ten times faster (it shows at 2 payloads a sample)
            if len(data) != p.size or imagecodecs.deflate_crc32(data) != p.crc32:
                raise ShardError(
                    f"shard {_join(self.url, record.shard)} is corrupt: payload {record.id}/{g} "
                    f"({p.size} bytes at {p.offset}) fails its CRC32 check"
                )
            try:
                out[g] = _decode_payload(data, p.shape)
            except Exception as exc:
                raise ShardError(
                    f"shard {_join(self.url, record.shard)}: payload {record.id}/{g} does not decode: {exc}"
                ) from None
        return out


def _decode_payload(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """A GeoTIFF payload's pixels: the layout the TACO sink writes without GDAL, any other through rasterio."""
    pixels = decode_geotiff(data, shape)
    if pixels is not None:
        return pixels
    from rasterio.io import MemoryFile

    with MemoryFile(io.BytesIO(data)) as mem, mem.open() as ds:
        return ds.read().reshape(shape)


def _taco_times(row: Mapping[str, Any]) -> np.ndarray:
    values = [np.datetime64(t) if t else np.datetime64("NaT") for t in json.loads(row["eoprep:datetimes"])]
    return _micros(np.array(values, dtype="datetime64[us]"))


def names_store(url: str) -> bool:
    """Whether ``url`` points at a Zarr store (``….zarr``) rather than at the output directory holding it."""
    return url.rstrip("/").rsplit("/", 1)[-1].endswith(".zarr")


def names_taco_folder(url: str) -> bool:
    """Whether ``url`` points at an output's ``taco`` folder: by its whole name, as an output directory
    may well end in "taco" itself (``out/demo-taco``)."""
    return url.rstrip("/").rsplit("/", 1)[-1] == "taco"


def open_source(
    path: str,
    *,
    format: Literal["auto", "zarr", "taco"] = "auto",
    storage_options: Mapping[str, Any] | None = None,
) -> ZarrSource | TacoSource:
    """Open the Zarr store or the TACO shards of an output directory (local path or fsspec URL).

    ``path`` may be the output directory, its ``chips.zarr`` or its ``taco`` folder. With
    ``format="auto"`` a ``.zarr`` path or a directory holding ``chips.zarr`` reads Zarr, a ``taco``
    folder reads TACO.
    """
    url = str(path).rstrip("/")
    options = dict(storage_options or {})
    if format == "auto":
        if names_store(url):
            format = "zarr"
        elif names_taco_folder(url):
            format = "taco"
        else:
            fs, root = fsspec.core.url_to_fs(url, **options)
            if fs.exists(_join(root, "chips.zarr")):
                format = "zarr"
            elif fs.exists(_join(root, "taco", ".tacocat")):
                format = "taco"
            else:
                raise EoprepError(f"{url}: neither chips.zarr nor taco/.tacocat here; is it an eoprep output?")
    if format == "zarr":
        return ZarrSource(url if names_store(url) else _join(url, "chips.zarr"), storage_options=options)
    if format == "taco":
        return TacoSource(url if names_taco_folder(url) else _join(url, "taco"), storage_options=options)
    raise EoprepError(f"format must be 'auto', 'zarr' or 'taco', got {format!r}")
