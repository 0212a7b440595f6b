"""Chips: a grid cell × a time window. Planning happens on the client, assembly on the workers.

A plan is plain picklable data (item dicts, not open datasets), so shipping it to a worker costs
little and the worker needs nothing but the files.
"""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pystac
import shapely

from eoprep.config import CollectionSpec, PipelineSpec, split_range
from eoprep.grid import Cell, GlobalGrid, chip_id
from eoprep.sources import ChipGrid, read_items

__all__ = ["ChipPlan", "ChipResult", "CollectionLayout", "SlotPlan", "build_chip", "plan_chips"]

#: SCL classes counted as cloud / shadow / nodata for a Sentinel-2 L2A chip's cloud fraction and composites.
SCL_CLOUDY = (3, 8, 9, 10)


@dataclass(frozen=True)
class CollectionLayout:
    """What one collection's chips look like: bands, dtype, fill value and time-axis length."""

    key: str
    collection: str
    bands: tuple[str, ...]
    dtype: str
    nodata: float
    n_time: int
    scale: tuple[float, ...]
    offset: tuple[float, ...]
    resampling: dict[str, str]


@dataclass(frozen=True)
class SlotPlan:
    """One step of a chip's time axis: a label and the items that fill it."""

    time: pd.Timestamp
    items: tuple[dict[str, Any], ...]


@dataclass
class ChipPlan:
    """Everything a worker needs to build one chip: its grid and, per collection, its time slots."""

    id: str
    cell: str
    grid: ChipGrid
    footprint_wkt: str
    start: pd.Timestamp
    end: pd.Timestamp
    slots: dict[str, list[SlotPlan]] = field(default_factory=dict)

    def item_ids(self, key: str) -> list[str]:
        return [item["id"] for slot in self.slots.get(key, []) for item in slot.items]


@dataclass
class ChipResult:
    """What happened to one chip on the worker."""

    id: str
    written: bool
    reason: str | None = None
    valid_fraction: dict[str, float] = field(default_factory=dict)
    cloud_fraction: dict[str, float] = field(default_factory=dict)
    attempts: int = 1


def collection_layout(spec: PipelineSpec, coll: CollectionSpec, items: Sequence[pystac.Item]) -> CollectionLayout:
    """Derive dtype, nodata and scale/offset per band from the items' ``raster:bands`` metadata."""
    dtypes, nodatas, scales, offsets = [], [], [], []
    for band in coll.bands:
        raster = _raster_info(items, band)
        dtypes.append(np.dtype(raster.get("data_type", "float32")))
        nodatas.append(raster.get("nodata"))
        scales.append(float(raster.get("scale", 1.0)))
        offsets.append(float(raster.get("offset", 0.0)))
    dtype = np.result_type(*dtypes)
    nodata = next((_as_number(v) for v in nodatas if v is not None), np.nan if dtype.kind == "f" else 0)
    if spec.time.mode == "scenes":
        n_time = spec.time.max_scenes
    else:
        assert spec.time.period is not None
        n_time = max(len(split_range(a, b, spec.time.period)) for a, b in spec.windows())
    resampling = {b: coll.resampling.get(b, spec.loader.resampling) for b in coll.bands}
    return CollectionLayout(
        key=coll.key,
        collection=coll.id,
        bands=tuple(coll.bands),
        dtype=dtype.name,
        nodata=float(nodata),
        n_time=n_time,
        scale=tuple(scales),
        offset=tuple(offsets),
        resampling=resampling,
    )


def _as_number(value: Any) -> float:
    return float("nan") if isinstance(value, str) and value.lower() == "nan" else float(value)


def _raster_info(items: Sequence[pystac.Item], band: str) -> dict[str, Any]:
    for item in items:
        asset = item.assets.get(band)
        if asset is not None:
            bands = asset.extra_fields.get("raster:bands") or [{}]
            info = dict(bands[0])
            if "data_type" not in info and "data_type" in asset.extra_fields:
                info["data_type"] = asset.extra_fields["data_type"]
            return info
    return {}


def _solar_day(item: pystac.Item) -> pd.Timestamp:
    """Local solar date of an acquisition: same-pass tiles share it even across UTC midnight."""
    lon = shapely.geometry.shape(item.geometry).centroid.x if item.geometry else 0.0
    when = pd.Timestamp(item.datetime).tz_convert("UTC") + pd.Timedelta(hours=lon / 15.0)
    return when.normalize()


def plan_chips(
    spec: PipelineSpec,
    grid: GlobalGrid,
    cells: Sequence[Cell],
    items: dict[str, list[pystac.Item]],
    layouts: dict[str, CollectionLayout],
) -> tuple[list[ChipPlan], list[tuple[str, str]]]:
    """Chips (cell × window) with at least one item, and notes on what was left out and why."""
    footprints = {key: [shapely.geometry.shape(it.geometry) for it in its] for key, its in items.items()}
    plans, notes = [], []
    for cell in cells:
        chip_poly = cell.footprint
        grid_ = ChipGrid(cell.crs, cell.x0, cell.y0, cell.size, cell.pixel_size)
        for start, end in spec.windows():
            cid = chip_id(cell.id, start.date(), end.date())
            plan = ChipPlan(cid, cell.id, grid_, chip_poly.wkt, start, end)
            for key, its in items.items():
                hits = [
                    it
                    for it, fp in zip(its, footprints[key], strict=True)
                    if start <= pd.Timestamp(it.datetime) <= end and fp.intersects(chip_poly)
                ]
                slots = _slots(spec, hits, start, end)
                if len(slots) > layouts[key].n_time:
                    notes.append((cid, f"{key}: {len(slots) - layouts[key].n_time} scenes beyond time.max_scenes"))
                    slots = slots[: layouts[key].n_time]
                plan.slots[key] = slots
            if any(plan.slots.values()):
                plans.append(plan)
            else:
                notes.append((cid, "no items intersect this chip"))
    return plans, notes


def _slots(spec: PipelineSpec, hits: list[pystac.Item], start: pd.Timestamp, end: pd.Timestamp) -> list[SlotPlan]:
    if spec.time.mode == "scenes":
        days: dict[pd.Timestamp, list[pystac.Item]] = {}
        for item in hits:
            days.setdefault(_solar_day(item), []).append(item)
        return [
            SlotPlan(pd.Timestamp(members[0].datetime).tz_convert("UTC"), tuple(m.to_dict() for m in members))
            for _, members in sorted(days.items())
        ]
    assert spec.time.period is not None
    return [
        SlotPlan(
            a,
            tuple(
                it.to_dict()
                for it in hits
                if a <= pd.Timestamp(it.datetime) < b or (b == end and pd.Timestamp(it.datetime) == end)
            ),
        )
        for a, b in split_range(start, end, spec.time.period)
    ]


def build_chip(
    plan: ChipPlan,
    layout: CollectionLayout,
    *,
    engine: str,
    retries: int,
    backoff: float,
    sleep: Callable[[float], None] = time.sleep,
    composite: bool = False,
) -> tuple[np.ndarray, int]:
    """The chip array (time, band, y, x) for one collection, padded with nodata; and read attempts used.

    Reads are retried with exponential backoff and jitter; the last error propagates.
    """
    dtype = np.dtype(layout.dtype)
    out = np.full((layout.n_time, len(layout.bands), plan.grid.size, plan.grid.size), layout.nodata, dtype=dtype)
    attempts = 0
    for t, slot in enumerate(plan.slots.get(layout.key, [])):
        if not slot.items:
            continue
        for attempt in range(retries + 1):
            attempts += 1
            try:
                scenes = read_items(
                    slot.items,
                    layout.bands,
                    plan.grid,
                    dtype=dtype,
                    nodata=layout.nodata,
                    engine=engine,
                    resampling=layout.resampling,
                )
                break
            except Exception:
                if attempt == retries:
                    raise
                sleep(backoff * 2**attempt * (0.5 + random.random()))
        out[t] = _median_of_clear(scenes, layout) if composite else _first_valid(scenes, layout.nodata)
    return out, max(attempts, 1)


def _invalid(data: np.ndarray, nodata: float) -> np.ndarray:
    return np.isnan(data) if np.isnan(nodata) else data == nodata


def _first_valid(scenes: np.ndarray, nodata: float) -> np.ndarray:
    """Mosaic same-day scenes: each pixel from the first scene that has data there."""
    out = scenes[0].copy()
    for scene in scenes[1:]:
        hole = _invalid(out, nodata)
        out[hole] = scene[hole]
    return out


def _median_of_clear(scenes: np.ndarray, layout: CollectionLayout) -> np.ndarray:
    """Per-pixel median of the scenes where the pixel is valid and (with SCL) not cloud or shadow."""
    bad = _invalid(scenes, layout.nodata).any(axis=1)
    if "SCL" in layout.bands:
        bad |= np.isin(scenes[:, layout.bands.index("SCL")], SCL_CLOUDY)
    values = np.where(bad[:, None], np.nan, scenes.astype(np.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(values, axis=0)
    if "SCL" in layout.bands:
        k = layout.bands.index("SCL")
        scl = scenes[:, k]
        median[k] = np.where(bad.all(axis=0), layout.nodata, _mode_of_clear(scl, bad))
    median = np.where(np.isnan(median), layout.nodata, median)
    dtype = np.dtype(layout.dtype)
    return np.round(median).astype(dtype) if dtype.kind in "iu" else median.astype(dtype)


def _mode_of_clear(scl: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """A class layer is composited by taking the class of the first clear scene, never by averaging."""
    first_clear = np.argmax(~bad, axis=0)
    return np.take_along_axis(scl, first_clear[None], axis=0)[0]


def chip_quality(chip: np.ndarray, layout: CollectionLayout) -> tuple[float, float]:
    """Valid fraction (pixels with data in all bands, over filled slots) and cloud fraction from SCL."""
    filled = ~_invalid(chip, layout.nodata).all(axis=(1, 2, 3))
    if not filled.any():
        return 0.0, float("nan")
    data = chip[filled]
    valid = ~_invalid(data, layout.nodata).any(axis=1)
    cloud = float("nan")
    if "SCL" in layout.bands:
        scl = data[:, layout.bands.index("SCL")]
        cloud = float(np.isin(scl, SCL_CLOUDY[1:])[valid].mean()) if valid.any() else float("nan")
    return float(valid.mean()), cloud
