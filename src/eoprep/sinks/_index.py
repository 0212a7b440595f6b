"""Side files of an output: the GeoParquet chip index, the STAC catalog of the chips, run manifests.

All of them are derived from the Zarr store's coordinates (the one source of truth) and replaced
atomically (write to a temporary name, then rename), so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
import xarray as xr
import zarr

from eoprep import __version__
from eoprep.sinks._zarr import ChipStore

__all__ = ["INDEX_FILE", "STAC_DIR", "atomic_write", "read_index", "write_index", "write_manifest", "write_stac"]

INDEX_FILE = "index.parquet"
STAC_DIR = "stac"
RUNS_DIR = "runs"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder and rename it: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _atomic_json(path: Path, doc: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(doc, indent=1, default=str)))


def _write_if_changed(path: Path, data: bytes) -> None:
    """Write only when the bytes differ: a refresh leaves unchanged files (and their mtimes) alone."""
    try:
        if path.read_bytes() == data:
            return
    except FileNotFoundError:
        pass
    atomic_write(path, lambda p: p.write_bytes(data))


def _texts(values: np.ndarray) -> list[str]:
    return [str(v) for v in values]


def _as_utc(values: np.ndarray) -> pd.DatetimeIndex:
    return pd.DatetimeIndex(values).tz_localize("UTC")


_COLUMNS = (
    "chip", "written", "cell", "crs", "window_start", "window_end", "datetime",
    "valid_fraction", "cloud_fraction", "item_ids", "footprint",
)  # fmt: skip


def chip_table(store_url: str) -> gpd.GeoDataFrame:
    """One row per written chip and collection, read from the store's coordinates."""
    root = zarr.open_group(store_url, mode="r", zarr_format=3)
    frames = []
    for key in sorted(root.group_keys()):
        columns = ChipStore(store_url).columns(key, _COLUMNS) or _xarray_columns(store_url, key)
        index = np.flatnonzero(columns["written"])
        if not len(index):
            continue
        col = {name: values[index] for name, values in columns.items()}
        frame = pd.DataFrame(
            {
                "id": _texts(col["chip"]),
                "collection": key,
                "stac_collection": str(root[f"{key}/pixels"].attrs.get("collection", key)),
                "index": index,
                "cell": _texts(col["cell"]),
                "crs": _texts(col["crs"]),
                "start_datetime": _as_utc(col["window_start"]),
                "end_datetime": _as_utc(col["window_end"]),
                "n_scenes": (~np.isnat(col["datetime"])).sum(axis=1).astype("int32"),
                "valid_fraction": col["valid_fraction"],
                "cloud_fraction": col["cloud_fraction"],
                "item_ids": _texts(col["item_ids"]),
            }
        )
        frame["geometry"] = shapely.from_wkt(_texts(col["footprint"]))
        frames.append(frame)
    if not frames:
        return gpd.GeoDataFrame({"id": [], "geometry": []}, geometry="geometry", crs="EPSG:4326")
    return gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), geometry="geometry", crs="EPSG:4326")


def _xarray_columns(store_url: str, key: str) -> dict[str, np.ndarray]:
    ds = xr.open_zarr(store_url, group=key, zarr_format=3, consolidated=False, chunks=None)
    return {name: ds[name].values for name in _COLUMNS}


def write_index(out_dir: Path, store_url: str) -> gpd.GeoDataFrame:
    """Rewrite ``index.parquet`` (GeoParquet) from the store."""
    table = chip_table(store_url)
    atomic_write(out_dir / INDEX_FILE, lambda p: table.to_parquet(p, index=False))
    return table


def read_index(out_dir: Path) -> gpd.GeoDataFrame:
    """The chip index of an output directory."""
    return gpd.read_parquet(out_dir / INDEX_FILE)


def write_stac(out_dir: Path, table: gpd.GeoDataFrame, *, name: str, spec_hash: str) -> Path:
    """A static STAC collection with one item per chip, whose assets point into the Zarr groups.

    Every item is rebuilt on each run and written only where it changed. Footprints are densified
    polygons (~130 vertices): GEOS writes their GeoJSON for all chips at once and orjson embeds it as
    is, which halved a refresh's STAC update against ``mapping`` + ``json.dumps`` per chip (85 → 41 ms
    for 160 chips).
    """
    import orjson

    stac_dir = out_dir / STAC_DIR
    items_dir = stac_dir / "items"
    ids = []
    geometry = np.asarray(table.geometry.values)
    geojson = shapely.to_geojson(geometry) if len(table) else []
    bboxes = shapely.bounds(geometry).tolist() if len(table) else []
    by_chip: dict[str, list[int]] = {}
    records = table.drop(columns="geometry").to_dict("records")  # plain dicts: row access costs more than the JSON
    for i, row in enumerate(records):
        by_chip.setdefault(str(row["id"]), []).append(i)
    for chip in sorted(by_chip):
        rows = [records[i] for i in by_chip[chip]]
        first, at = rows[0], by_chip[chip][0]
        assets = {
            row["collection"]: {
                "href": f"../../chips.zarr/{row['collection']}",
                "type": "application/vnd+zarr",
                "roles": ["data"],
                "title": f"{row['stac_collection']} pixels (chip index {row['index']})",
                "eoprep:index": int(row["index"]),
                "eoprep:n_scenes": int(row["n_scenes"]),
                "eoprep:valid_fraction": _num(row["valid_fraction"]),
                "eoprep:cloud_fraction": _num(row["cloud_fraction"]),
            }
            for row in rows
        }
        item = {
            "type": "Feature",
            "stac_version": "1.1.0",
            "stac_extensions": ["https://stac-extensions.github.io/projection/v2.0.0/schema.json"],
            "id": chip,
            "collection": name,
            "geometry": orjson.Fragment(geojson[at]),
            "bbox": bboxes[at],
            "properties": {
                "datetime": None,
                "start_datetime": first["start_datetime"].isoformat(),
                "end_datetime": first["end_datetime"].isoformat(),
                "proj:code": first["crs"],
                "eoprep:cell": first["cell"],
                "eoprep:spec_hash": spec_hash,
            },
            "links": [{"rel": "collection", "href": "../collection.json", "type": "application/json"}],
            "assets": assets,
        }
        _write_if_changed(items_dir / f"{chip}.json", orjson.dumps(item))
        ids.append(chip)
    bounds = table.total_bounds.tolist() if len(table) else [-180.0, -90.0, 180.0, 90.0]
    interval = (
        [table.start_datetime.min().isoformat(), table.end_datetime.max().isoformat()] if len(table) else [None, None]
    )
    collection = {
        "type": "Collection",
        "stac_version": "1.1.0",
        "id": name,
        "title": f"eoprep chips: {name}",
        "description": "Training chips on the eoprep global grid, stored in chips.zarr (one group per source "
        "collection) and indexed in index.parquet.",
        "license": "other",
        "extent": {"spatial": {"bbox": [bounds]}, "temporal": {"interval": [interval]}},
        "assets": {
            "zarr": {"href": "../chips.zarr", "type": "application/vnd+zarr", "roles": ["data"]},
            "index": {"href": f"../{INDEX_FILE}", "type": "application/vnd.apache.parquet", "roles": ["metadata"]},
        },
        "links": [{"rel": "item", "href": f"./items/{i}.json", "type": "application/geo+json"} for i in ids],
        "eoprep:version": __version__,
    }
    path = stac_dir / "collection.json"
    _atomic_json(path, collection)
    return path


def _num(value: float) -> float | None:
    return None if value is None or np.isnan(value) else float(value)


def write_manifest(out_dir: Path, run_id: str, manifest: dict[str, Any]) -> Path:
    """Record a run (spec, versions, inputs, outcomes, timings) under ``runs/``."""
    path = out_dir / RUNS_DIR / f"{run_id}.json"
    _atomic_json(path, manifest)
    return path
