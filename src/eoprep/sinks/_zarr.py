"""Zarr v3 chip store: one group per collection, one inner chunk per chip, shards of many chips.

Layout of group ``<key>`` (plain xarray/zarr can read it, no eoprep needed unless a custom codec is used)::

    pixels        (chip, time, band, y, x)   raw values, nodata as fill value
    chip          (chip)                     chip id "<cell>_<YYYYMMDD>-<YYYYMMDD>"
    cell, crs, footprint, item_ids (chip)    strings; footprint is lon/lat WKT
    transform     (chip, affine)             GDAL geotransform of the chip in its CRS
    easting       (chip, x), northing (chip, y)   pixel-centre coordinates
    datetime      (chip, time)               acquisition (or period start), NaT where padded
    window_start, window_end (chip)
    inputs        (chip)                     JSON list of per-slot input signatures (items + fingerprints)
    written, valid_fraction, cloud_fraction (chip)   filled in when a chip's shard is written
    shift_x, shift_y, shift_confidence, shift_applied (chip, time)   co-registration: estimated shift
                                             of each scene in metres east/north, its confidence, corrected or not
    band, scale, offset (band)               STAC asset keys and their raster:bands scale/offset

Workers write whole shards (a shard-aligned slice of chips) in one assignment; zarr's local store
writes each object through a temporary file and a rename, so a shard is replaced atomically.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
import zarr
from zarr.codecs import BloscCodec
from zarr.storage import LocalStore

from eoprep import __version__
from eoprep.chips import ChipPlan, ChipResult, CollectionLayout
from eoprep.config import PipelineSpec
from eoprep.errors import EoprepError
from eoprep.shard_format import ShardFormat
from eoprep.sinks._direct import write_direct

__all__ = ["CHIPS_STORE", "ChipStore", "ShardWriter", "consecutive_runs"]

CHIPS_STORE = "chips.zarr"
_NAT = np.iinfo(np.int64).min
#: Blosc LZ4 with byte shuffle (zarr-python 2's default): a Zarr v3 core codec, so plain zarr reads it;
#: it encodes ~5x and decodes ~3x faster than zstd level 3 for ~25 % more bytes. Chips are written once
#: on a busy worker and read every training epoch; ``output.codec: {name: zstd}`` trades that speed for size.
DEFAULT_COMPRESSOR = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
_TIME_ENCODING = {"units": "microseconds since 1970-01-01", "dtype": "int64", "_FillValue": _NAT}


def _strings(values: Sequence[str]) -> np.ndarray:
    """Variable-length strings: the one string type with a stable Zarr v3 representation in zarr-python."""
    return np.array(list(values), dtype=object)


def _naive_utc(ts: pd.Timestamp) -> np.datetime64:
    return np.datetime64(ts.tz_convert("UTC").tz_localize(None) if ts.tzinfo else ts, "ns")


@dataclass(frozen=True)
class ShardSlice:
    """Chip positions inside one shard: the unit of work, and of atomic writes when the shard is whole."""

    positions: tuple[int, ...]
    plans: tuple[ChipPlan, ...]


@dataclass(frozen=True)
class ChipState:
    """What the store knows of one chip: where it is, whether it was written, from which inputs, and how
    it rated (NaN until a run rated it: a chip whose reads failed, or that a run was killed before rating)."""

    position: int
    written: bool
    inputs: list[str]
    valid_fraction: float = float("nan")
    cloud_fraction: float = float("nan")


def shard_slices(positions: Sequence[int], plans: Sequence[ChipPlan], per_shard: int) -> list[ShardSlice]:
    """Group chips by the shard their position falls in, so no two tasks write the same shard."""
    by_shard: dict[int, list[tuple[int, ChipPlan]]] = {}
    for pos, plan in sorted(zip(positions, plans, strict=True), key=lambda pair: pair[0]):
        by_shard.setdefault(pos // per_shard, []).append((pos, plan))
    return [ShardSlice(tuple(p for p, _ in group), tuple(pl for _, pl in group)) for group in by_shard.values()]


class ChipStore:
    """The Zarr side of an output directory: create, extend, write shards, record results."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _root(self, mode: str = "r") -> zarr.Group:
        # Consolidated metadata is refreshed only at the end of a run; mid-run it is stale.
        return zarr.open_group(self.url, mode=mode, zarr_format=3, use_consolidated=False)  # type: ignore[arg-type]

    def exists(self) -> bool:
        try:
            self._root()
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            return False
        return True

    def chip_ids(self, key: str) -> list[str]:
        """Chip ids already allocated in a group, in position order."""
        root = self._root()
        if key not in root:
            return []
        return [str(v) for v in root[f"{key}/chip"][:]]

    def _members(self, key: str) -> set[str]:
        """Names of a group's arrays and subgroups, from one listing (``array_keys`` reads every member's
        metadata: 11 ms of a 90 ms no-op refresh)."""
        from zarr.core.sync import sync

        root = self._root()

        async def names() -> set[str]:
            found: set[str] = set()
            async for name in root.store.list_dir(key):
                found.add(name)
            return found

        return {name for name in sync(names()) if name != "zarr.json"}

    def check_compatible(self, spec: PipelineSpec, layouts: dict[str, CollectionLayout]) -> None:
        """Refuse to extend an output made with another grid or chip layout: mixing them corrupts it."""
        root = self._root()
        grid = dict(root.attrs).get("eoprep:grid", {})
        if grid and (grid.get("cell_size"), grid.get("pixel_size")) != (spec.grid.cell_size, spec.grid.pixel_size):
            raise EoprepError(
                f"output.path: {self.url} was written with grid {grid}; this spec uses "
                f"cell_size={spec.grid.cell_size}, pixel_size={spec.grid.pixel_size}. Use a new output path."
            )
        present = [key for key in layouts if key in root]
        if present and len(present) < len(layouts):
            raise EoprepError(
                f"output.path: {self.url} holds the collections {present} but not "
                f"{[key for key in layouts if key not in present]}; a spec cannot add collections to an output. "
                "Use a new output path."
            )
        for key in present:
            layout = layouts[key]
            missing = sorted(set(_STATE_ARRAYS) - self._members(key))
            if missing:
                version = dict(root.attrs).get("eoprep:version", "unknown")
                raise EoprepError(
                    f"output.path: group {key!r} of {self.url} lacks {missing}, which this eoprep needs "
                    f"(written by eoprep {version}). Use a new output path."
                )
            arr = root[f"{key}/pixels"]
            bands = [str(b) for b in root[f"{key}/band"][:]]
            if bands != list(layout.bands) or arr.shape[1] != layout.n_time or arr.dtype != np.dtype(layout.dtype):
                raise EoprepError(
                    f"output.path: group {key!r} of {self.url} has bands {bands}, {arr.shape[1]} time steps and "
                    f"dtype {arr.dtype}; this spec asks for {list(layout.bands)}, {layout.n_time}, {layout.dtype}. "
                    "Use a new output path."
                )

    def allocate(
        self,
        spec: PipelineSpec,
        layouts: dict[str, CollectionLayout],
        plans: Sequence[ChipPlan],
        codecs: dict[str, dict[str, Any]] | None = None,
    ) -> range:
        """Append the planned chips to every group (metadata only); returns their positions.

        Chips are appended after the existing ones, so earlier full shards are never rewritten;
        only a trailing, partly filled shard is completed.
        """
        n0 = len(self.chip_ids(next(iter(layouts)))) if self.exists() else 0
        if n0 == 0:
            root_attrs = {
                "eoprep:version": __version__,
                "eoprep:grid": {"cell_size": spec.grid.cell_size, "pixel_size": spec.grid.pixel_size},
                "eoprep:spec_name": spec.name,
            }
            size, per_shard = plans[0].grid.size, spec.output.chips_per_shard
            self._create(
                root_attrs,
                {
                    key: (_metadata_dataset(plans, layout), _encoding(layout, size, per_shard, (codecs or {}).get(key)))
                    for key, layout in layouts.items()
                },
            )
            return range(0, len(plans))
        for key, layout in layouts.items():
            ds = _metadata_dataset(plans, layout).drop_vars(["band", "scale", "offset"])
            if not self._append(key, ds, n0):
                _lazy_pixels(ds).to_zarr(
                    self.url,
                    group=key,
                    mode="a",
                    append_dim="chip",
                    compute=False,
                    consolidated=False,
                    safe_chunks=False,
                )
        return range(n0, n0 + len(plans))

    def _create(self, root_attrs: dict[str, Any], groups: dict[str, tuple[xr.Dataset, dict[str, Any]]]) -> None:
        """Create the root and one group per collection, their arrays and values; the pixels get metadata
        only (the tasks write them).

        What xarray's ``to_zarr(compute=False)`` writes, array for array (tested), without its ~70 round
        trips to zarr's event loop (one per array created, filled or annotated: 0.15-0.2 s on the client
        while every worker waited for its first chip). Built in memory, then stored object by object with
        the root's metadata last (`_store_objects`).
        """
        from zarr.api.asynchronous import open_group
        from zarr.core.buffer import Buffer
        from zarr.core.sync import sync
        from zarr.storage import MemoryStore

        objects: dict[str, Buffer] = {}

        async def create_group(root: zarr.AsyncGroup, key: str, ds: xr.Dataset, encoding: dict[str, Any]) -> None:
            group = await root.create_group(key, attributes=_group_attrs(ds))
            specs = {
                name: _array_spec(
                    ds[name].variable,
                    encoding.get(name, {}),
                    _coordinates_of(ds, ds[name]) if name in ds.data_vars else (),
                )
                for name in ds.variables
            }
            names = list(specs)
            arrays = await asyncio.gather(*(group.create_array(name, **specs[name][0]) for name in names))
            await asyncio.gather(
                *(
                    arr.setitem(slice(None), specs[name][1])
                    for name, arr in zip(names, arrays, strict=True)
                    if name != "pixels"
                )
            )

        async def create() -> None:
            root = await open_group(MemoryStore(objects), mode="w", zarr_format=3, attributes=root_attrs)
            await asyncio.gather(*(create_group(root, key, ds, enc) for key, (ds, enc) in groups.items()))

        sync(create())
        _store_objects(self.url, {key: buffer.to_bytes() for key, buffer in objects.items()})

    def _append(self, key: str, ds: xr.Dataset, n0: int) -> bool:
        """Append ``ds`` along ``chip`` to the group's arrays in one pass of concurrent zarr calls.

        xarray's append opens, resizes and writes every array in its own round trip to zarr's event
        loop (about 70 of them, 0.15 s, for 20 chips), which made appending cost a quarter of a
        one-date refresh. Values are encoded the way the arrays already hold them; False (nothing
        changed) when one is stored in a way this does not encode, and xarray appends instead.
        """
        from zarr.api.asynchronous import open_group
        from zarr.core.sync import sync

        n = ds.sizes["chip"]

        async def append() -> bool:
            group = await open_group(self.url, path=key, mode="r+", zarr_format=3)
            names = list(ds.variables)
            try:
                arrays = await asyncio.gather(*(group.getitem(name) for name in names))
            except KeyError:
                return False  # a variable the store lacks: xarray's append names it
            if any(not isinstance(arr, zarr.AsyncArray) or arr.shape[0] != n0 for arr in arrays):
                return False
            values = {
                name: _encoded(ds[name], arr.attrs)
                for name, arr in zip(names, arrays, strict=True)
                if name != "pixels"  # metadata only: the new chips' pixels are written by the tasks
            }
            if any(v is None for v in values.values()):
                return False
            await asyncio.gather(*(arr.resize((n0 + n, *arr.shape[1:])) for arr in arrays))
            await asyncio.gather(
                *(
                    arr.setitem(slice(n0, n0 + n), values[name])
                    for name, arr in zip(names, arrays, strict=True)
                    if name in values
                )
            )
            return True

        return sync(append())

    def columns(self, key: str, names: Sequence[str]) -> dict[str, np.ndarray] | None:
        """Whole per-chip arrays of a group, times decoded, read in one pass of concurrent zarr calls.

        ``xr.open_zarr`` opens every array of the group one round trip at a time, which cost the chip
        index 0.1 s of a refresh; None when a time array is stored in a way `_decoded` does not undo.
        """
        from zarr.api.asynchronous import open_group
        from zarr.core.sync import sync

        async def read() -> list[tuple[np.ndarray, dict[str, Any]]]:
            group = await open_group(self.url, path=key, mode="r", zarr_format=3, use_consolidated=False)
            arrays = await asyncio.gather(*(group.getitem(name) for name in names))
            values = await asyncio.gather(*(arr.getitem(slice(None)) for arr in arrays))
            return [(np.asarray(v), dict(arr.attrs)) for v, arr in zip(values, arrays, strict=True)]

        out = {name: _decoded(values, attrs) for name, (values, attrs) in zip(names, sync(read()), strict=True)}
        return None if any(v is None for v in out.values()) else out  # type: ignore[return-value]

    def shard_writer(self, key: str, positions: Sequence[int], *, direct_io: bool = False) -> ShardWriter:
        """A writer for chips of one group that share a shard; used on workers, one shard at a time."""
        return ShardWriter(self.url, key, positions, direct_io=direct_io)

    def read_chip(self, key: str, position: int) -> np.ndarray:
        """One stored chip (time, band, y, x), e.g. to reuse its unchanged time slots."""
        arr = zarr.open_array(self.url, path=f"{key}/pixels", mode="r", zarr_format=3)  # type: ignore[arg-type]
        return arr[position]

    def states(self, key: str) -> dict[str, ChipState]:
        """Every allocated chip of a group by id."""
        if not self.exists() or key not in self._root():
            return {}
        names = ("chip", "written", "inputs", "valid_fraction", "cloud_fraction")
        columns = self.columns(key, names)
        if columns is None:  # only a time array can be undecodable, and none of these is one
            raise EoprepError(f"output.path: group {key!r} of {self.url} holds chip states this eoprep cannot read")
        ids, written, inputs, valid, cloud = (columns[name] for name in names)
        return {
            str(cid): ChipState(i, bool(w), json.loads(str(inp)) if inp else [], float(v), float(c))
            for i, (cid, w, inp, v, c) in enumerate(zip(ids, written, inputs, valid, cloud, strict=True))
        }

    def reset(self, layouts: dict[str, CollectionLayout], positions: Sequence[int], plans: Sequence[ChipPlan]) -> None:
        """Point existing chips at new inputs before they are rewritten; they read as unwritten and unrated
        until then (an old rating must not pass for the new inputs' if the run is killed before it rates them)."""
        root = self._root("r+")
        for key, layout in layouts.items():
            g = root[key]
            ds = _metadata_dataset(plans, layout)
            times = ds["datetime"].values.astype("datetime64[us]").astype(np.int64)
            times[np.isnat(ds["datetime"].values)] = _NAT
            for name, values in (
                ("datetime", times),
                ("item_ids", ds["item_ids"].values),
                ("inputs", ds["inputs"].values),
                ("written", ds["written"].values),
                ("valid_fraction", ds["valid_fraction"].values),
                ("cloud_fraction", ds["cloud_fraction"].values),
            ):
                arr = g[name]
                current = arr[:]
                current[list(positions)] = values
                arr[:] = current

    def record(
        self, layouts: dict[str, CollectionLayout], positions: dict[str, int], results: Sequence[ChipResult]
    ) -> None:
        """Store per-chip outcomes (written, valid and cloud fraction) in every group."""
        root = self._root("r+")
        for key in layouts:
            written = root[f"{key}/written"]
            valid = root[f"{key}/valid_fraction"]
            cloud = root[f"{key}/cloud_fraction"]
            w, v, c = written[:], valid[:], cloud[:]
            for res in results:
                i = positions[res.id]
                w[i] = res.written
                v[i] = res.valid_fraction.get(key, np.nan)
                c[i] = res.cloud_fraction.get(key, np.nan)
            written[:], valid[:], cloud[:] = w, v, c
            if any(entry is not None for res in results for entry in res.shifts.get(key, [])):
                _record_shifts(root[key], key, positions, results)

    def consolidate(self) -> None:
        """Refresh consolidated metadata so `xr.open_zarr` opens the store in one read."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(self.url)


class ShardWriter:
    """Writes one group's chips of one shard, handed over one by one as they are built.

    A whole shard's chips are encoded as they arrive, so the caller can build the next chip in the
    same buffer (a worker then holds one chip's pixels per group, and never faults in fresh memory
    for each of a shard's chips), and the shard is stored as one object by `close` (zarr's stores
    replace an object atomically; with ``direct_io``, a local store's shard is written past the page
    cache, `eoprep.sinks._direct`). Chips of a partial shard (a refresh rewriting some of them) are
    copied and written through zarr. Nothing is written before `close`.
    """

    def __init__(self, url: str, key: str, positions: Sequence[int], *, direct_io: bool = False) -> None:
        self._direct_io = direct_io
        self._arr = zarr.open_array(url, path=f"{key}/pixels", mode="r+", zarr_format=3)  # type: ignore[arg-type]
        self._positions = list(positions)
        per_shard = self._arr.shards[0]
        shard_no = self._positions[0] // per_shard
        self._first = shard_no * per_shard
        self._key = f"{self._arr.path}/{self._arr.metadata.encode_chunk_key((shard_no, 0, 0, 0, 0))}"
        whole = range(self._first, min(self._first + per_shard, self._arr.shape[0]))
        fmt = ShardFormat.from_metadata(self._arr.metadata.to_dict(), self._arr.fill_value)
        self._fmt = fmt if fmt is not None and self._positions == list(whole) else None
        self._payloads: list[bytes | None] = [None] * len(whole)
        self._chips: dict[int, np.ndarray] = {}
        self._added: set[int] = set()

    def add(self, position: int, chip: np.ndarray) -> None:
        """Take the chip at ``position``; ``chip`` may be overwritten once this returns."""
        if position not in self._positions:
            raise ValueError(f"chip position {position} is not one of this writer's {self._positions}")
        if self._fmt is not None:
            self._payloads[position - self._first] = self._fmt.encode_chip(chip)
        else:
            self._chips[position] = chip.copy()
        self._added.add(position)

    def close(self) -> int:
        """Store the shard; returns its stored size, i.e. the bytes this write put on storage."""
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        if missing := [p for p in self._positions if p not in self._added]:
            raise ValueError(f"chip positions {missing} were never added")
        if self._fmt is not None:
            parts = self._fmt.parts(self._payloads)
            if parts is None:
                sync(self._arr.store.delete(self._key))
                return 0
            store = self._arr.store
            if self._direct_io and isinstance(store, LocalStore):
                written = write_direct(store.root / self._key, parts)
                if written is not None:
                    return written
            blob = b"".join(parts)
            sync(store.set(self._key, default_buffer_prototype().buffer.from_bytes(blob)))
            return len(blob)
        for run in consecutive_runs(self._positions):
            self._arr[run.start : run.stop] = np.stack([self._chips[p] for p in run])
        try:
            return int(sync(self._arr.store.getsize(self._key)))
        except FileNotFoundError:
            return 0  # a shard of nothing but fill values is not stored at all


def _store_objects(url: str, objects: dict[str, bytes]) -> None:
    """Write a new store's objects, the root's ``zarr.json`` last, so a run killed meanwhile leaves no
    root and the next one creates the store anew.

    Into a local directory as plain files, each through a temporary name and a rename: zarr's local
    store took 0.07-0.09 s for the ~40 objects of a new store (a hop to a thread, then the same file
    operations, per object), this 8 ms. Elsewhere through the URL's fsspec store, concurrently.
    """
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync
    from zarr.storage import FsspecStore

    keys = sorted(objects, key=lambda key: key == "zarr.json")
    if "://" not in url or url.startswith("file://"):
        root = Path(url.removeprefix("file://"))
        for key in keys:
            path = root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
            partial.write_bytes(objects[key])
            os.replace(partial, path)
        return
    store = FsspecStore.from_url(url, read_only=False)
    buffer = default_buffer_prototype().buffer.from_bytes

    async def store_all() -> None:
        await asyncio.gather(*(store.set(key, buffer(objects[key])) for key in keys[:-1]))
        await store.set(keys[-1], buffer(objects[keys[-1]]))

    sync(store_all())


def consecutive_runs(positions: Sequence[int]) -> list[range]:
    """``positions`` cut into runs of consecutive positions, in order.

    zarr reads and writes a run as one slice; its integer-array (orthogonal) selection read 12 chips
    of a sharded array ~70x slower (8 s instead of 0.11 s) and fails outright on writes of positions
    with a gap in one shard (zarr 3.1: a shape mismatch inside the sharding codec).
    """
    runs: list[range] = []
    for position in positions:
        if runs and position == runs[-1].stop:
            runs[-1] = range(runs[-1].start, position + 1)
        else:
            runs.append(range(position, position + 1))
    return runs


def _encoding(layout: CollectionLayout, size: int, per_shard: int, codec: dict[str, Any] | None) -> dict[str, Any]:
    inner = (1, layout.n_time, len(layout.bands), size, size)
    pixels: dict[str, Any] = {
        "fill_value": np.dtype(layout.dtype).type(layout.nodata),
        "chunks": inner,
        "shards": (per_shard, *inner[1:]),
    }
    pixels.update(codec if codec is not None else {"compressors": [DEFAULT_COMPRESSOR]})
    return {
        "pixels": pixels,
        "datetime": dict(_TIME_ENCODING),
        "window_start": dict(_TIME_ENCODING),
        "window_end": dict(_TIME_ENCODING),
    }


#: xarray's encoding of a NaN ``_FillValue`` attribute in Zarr v3 (base64 of the float64 NaN's bytes).
_NAN_FILL_ATTR = "AAAAAAAA+H8="


def _group_attrs(ds: xr.Dataset) -> dict[str, Any]:
    """The group's ``coordinates``: coordinates the data variables cannot list, lacking one of their dims."""
    listed = {name for var in ds.data_vars.values() for name in _coordinates_of(ds, var)}
    rest = sorted(name for name in ds.coords if name not in ds.dims and name not in listed)
    return {"coordinates": " ".join(rest)} if rest else {}


def _coordinates_of(ds: xr.Dataset, var: xr.DataArray) -> list[str]:
    """The non-dimension coordinates xarray lists in ``var``'s ``coordinates`` attribute: those on its dims."""
    return sorted(name for name, c in ds.coords.items() if name not in ds.dims and set(c.dims) <= set(var.dims))


def _array_spec(
    var: xr.Variable, encoding: dict[str, Any], coordinates: Sequence[str] = ()
) -> tuple[dict[str, Any], np.ndarray | None]:
    """``create_array`` arguments and the values to store for one variable, encoded as xarray encodes it
    (CF time units with NaT as ``_FillValue``, NaN fill for floats, variable-length strings)."""
    attrs = dict(var.attrs)
    kwargs: dict[str, Any] = {"shape": var.shape, "dimension_names": var.dims, "dtype": var.dtype}
    values: np.ndarray | None = var.values
    if var.dtype.kind == "M":
        attrs.update(units=encoding["units"], calendar="proleptic_gregorian", _FillValue=int(encoding["_FillValue"]))
        kwargs["dtype"] = np.dtype(encoding["dtype"])
        values = _encoded(xr.DataArray(var), attrs)
    elif var.dtype.kind == "O":
        kwargs["dtype"] = str
    elif var.dtype.kind == "f":
        kwargs["fill_value"] = np.nan
        attrs["_FillValue"] = _NAN_FILL_ATTR
    if "chunks" in encoding:
        kwargs.update(encoding)
    kwargs["attributes"] = {**attrs, **({"coordinates": " ".join(coordinates)} if coordinates else {})}
    return kwargs, values


#: The arrays besides the pixels that a run reads and updates (`check_compatible`, `states`, `reset`, `record`).
_STATE_ARRAYS = (
    "chip", "band", "written", "inputs", "item_ids", "datetime", "valid_fraction", "cloud_fraction",
    "shift_x", "shift_y", "shift_confidence", "shift_applied",
)  # fmt: skip

_SHIFT_ATTRS = {
    "shift_x": {"units": "m", "long_name": "estimated shift of the scene against the reference, east"},
    "shift_y": {"units": "m", "long_name": "estimated shift of the scene against the reference, north"},
    "shift_confidence": {"units": "1", "long_name": "margin of the best match over the best rival match"},
}


def _record_shifts(group: zarr.Group, key: str, positions: dict[str, int], results: Sequence[ChipResult]) -> None:
    """Per chip and time step: the estimated shift (metres), its confidence and whether it was corrected."""
    arrays = [group[name] for name in (*_SHIFT_ATTRS, "shift_applied")]
    values = [arr[:] for arr in arrays]
    for res in results:
        for t, entry in enumerate(res.shifts.get(key, [])):
            if entry is not None:
                for column, value in zip(values, entry, strict=True):
                    column[positions[res.id], t] = value
    for arr, column in zip(arrays, values, strict=True):
        arr[:] = column


_TIME_UNITS = {
    "days": 86_400_000_000,
    "hours": 3_600_000_000,
    "minutes": 60_000_000,
    "seconds": 1_000_000,
    "milliseconds": 1_000,
    "microseconds": 1,
}


def _encoded(var: xr.DataArray, attrs: dict[str, Any]) -> np.ndarray | None:
    """``var``'s values as an existing array written by xarray stores them, or None for an encoding not handled.

    Times: integers of ``<unit> since 1970-01-01`` (the units xarray picked when the array was created)
    with NaT as the ``_FillValue``; everything else is stored as is.
    """
    values = var.values
    if values.dtype.kind != "M":
        return values
    encoding = _time_encoding(attrs)
    if encoding is None:
        return None
    step, fill = encoding
    micros = values.astype("datetime64[us]").view(np.int64)
    if (micros[~np.isnat(values)] % step).any():
        return None  # not a whole number of the stored unit: xarray would pick other units
    return np.where(np.isnat(values), np.int64(fill), micros // step)


def _decoded(values: np.ndarray, attrs: dict[str, Any]) -> np.ndarray | None:
    """Stored values as xarray decodes them: the inverse of `_encoded` (None for a time encoding it does not undo)."""
    if " since " not in str(attrs.get("units", "")):
        return values
    encoding = _time_encoding(attrs)
    if encoding is None:
        return None
    step, fill = encoding
    times = (values.astype(np.int64) * step).astype("datetime64[us]").astype("datetime64[ns]")
    times[values == fill] = np.datetime64("NaT")
    return times


def _time_encoding(attrs: dict[str, Any]) -> tuple[int, int] | None:
    """(microseconds per stored unit, fill value) of a time array xarray stored as ``<unit> since 1970-01-01``
    with NaT as ``_FillValue``; None for any other time encoding."""
    unit, _, epoch = str(attrs.get("units", "")).partition(" since ")
    fill = attrs.get("_FillValue")
    if unit not in _TIME_UNITS or epoch.strip() not in ("1970-01-01", "1970-01-01T00:00:00") or fill is None:
        return None
    return _TIME_UNITS[unit], int(fill)


def _lazy_pixels(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` with its pixels as a dask array, so that xarray's ``to_zarr(compute=False)`` does not store them."""
    return ds.assign(pixels=ds["pixels"].chunk({"chip": 1}))


def _metadata_dataset(plans: Sequence[ChipPlan], layout: CollectionLayout) -> xr.Dataset:
    """Coordinates of the planned chips, with a pixel variable that only shapes the array: the fill value
    broadcast (no memory), never stored; xarray gets it as a lazy array (`_lazy_pixels`)."""
    n, size = len(plans), plans[0].grid.size
    times = np.full((n, layout.n_time), np.datetime64("NaT"), dtype="datetime64[ns]")
    for i, plan in enumerate(plans):
        for t, slot in enumerate(plan.slots.get(layout.key, [])):
            if not pd.isna(slot.time):
                times[i, t] = _naive_utc(slot.time)
    offsets = np.arange(size) + 0.5
    shape = (n, layout.n_time, len(layout.bands), size, size)
    pixels = np.broadcast_to(np.array(layout.nodata, dtype=layout.dtype), shape)
    attrs = {
        "collection": layout.collection,
        "nodata": layout.nodata,
        "resampling": json.dumps(layout.resampling),
        "long_name": f"{layout.collection} pixels on the eoprep chip grid",
    }
    return xr.Dataset(
        {"pixels": (("chip", "time", "band", "y", "x"), pixels, attrs)},
        coords={
            "chip": ("chip", _strings([p.id for p in plans])),
            "cell": ("chip", _strings([p.cell for p in plans])),
            "crs": ("chip", _strings([p.grid.crs for p in plans])),
            "footprint": ("chip", _strings([p.footprint_wkt for p in plans])),
            "item_ids": ("chip", _strings([json.dumps(p.item_ids(layout.key)) for p in plans])),
            "inputs": ("chip", _strings([json.dumps(p.inputs.get(layout.key, [])) for p in plans])),
            "transform": (
                ("chip", "affine"),
                np.array([[p.grid.x0, p.grid.pixel_size, 0.0, p.grid.y0, 0.0, -p.grid.pixel_size] for p in plans]),
            ),
            "easting": (("chip", "x"), np.array([p.grid.x0 + offsets * p.grid.pixel_size for p in plans])),
            "northing": (("chip", "y"), np.array([p.grid.y0 - offsets * p.grid.pixel_size for p in plans])),
            "datetime": (("chip", "time"), times),
            "window_start": ("chip", np.array([_naive_utc(p.start) for p in plans])),
            "window_end": ("chip", np.array([_naive_utc(p.end) for p in plans])),
            "written": ("chip", np.zeros(n, dtype=bool)),
            "valid_fraction": ("chip", np.full(n, np.nan, dtype=np.float32)),
            "cloud_fraction": ("chip", np.full(n, np.nan, dtype=np.float32)),
            **{
                name: (("chip", "time"), np.full((n, layout.n_time), np.nan, dtype=np.float32), attrs)
                for name, attrs in _SHIFT_ATTRS.items()
            },
            "shift_applied": (("chip", "time"), np.zeros((n, layout.n_time), dtype=bool)),
            "band": ("band", _strings(layout.bands)),
            "scale": ("band", np.array(layout.scale)),
            "offset": ("band", np.array(layout.offset)),
        },
    )
