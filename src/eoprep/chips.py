"""Chips: a grid cell × a time window. Planning happens on the client, assembly on the workers.

A plan is plain picklable data (item dicts, not open datasets), so shipping it to a worker costs
little and the worker needs nothing but the files.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pystac
import shapely

from eoprep.align import AlignRole, MaskRule, QualityRules, mask_rule
from eoprep.config import CollectionSpec, PipelineSpec, split_range
from eoprep.grid import Cell, GlobalGrid, chip_id
from eoprep.sources import ChipGrid, is_nodata, read_items

__all__ = [
    "ChipPlan",
    "ChipResult",
    "CollectionLayout",
    "RowChip",
    "SlotPlan",
    "build_chip",
    "chip_quality",
    "empty_chip",
    "plan_chips",
    "quality_verdict",
    "read_chip_rows",
]

#: SAR polarisation band names: their collections are co-registered as SAR unless ``align.sar`` says otherwise.
SAR_BANDS = frozenset({"vv", "vh", "hh", "hv"})


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
    quality: QualityRules | None = None
    align: AlignRole | None = None


@dataclass(frozen=True)
class SlotPlan:
    """One step of a chip's time axis: a label and the items that fill it."""

    time: pd.Timestamp
    items: tuple[dict[str, Any], ...]


@dataclass
class ChipPlan:
    """Everything a worker needs to build one chip: its grid and, per collection, its time slots.

    ``inputs`` holds, per collection, one signature per time slot (item ids and their fingerprints):
    a chip whose signatures are unchanged since it was written needs no work. ``reuse`` says how many
    leading slots may be copied from the stored chip instead of being read again.
    """

    id: str
    cell: str
    grid: ChipGrid
    footprint_wkt: str
    start: pd.Timestamp
    end: pd.Timestamp
    slots: dict[str, list[SlotPlan]] = field(default_factory=dict)
    inputs: dict[str, list[str]] = field(default_factory=dict)
    reuse: dict[str, int] = field(default_factory=dict)

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
    #: Per collection and time step: (dx, dy) in metres east/north, confidence, corrected; None where not estimated.
    shifts: dict[str, list[tuple[float, float, float, bool] | None]] = field(default_factory=dict)
    attempts: int = 1
    #: Stored bytes of the shards its task wrote (counted on the first chip of each shard).
    bytes_written: int = 0


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
    q = spec.quality
    rule = mask_rule(
        coll.bands, mask_bands=q.mask_bands, scl=q.scl, qa_pixel=q.qa_pixel, exclude=q.exclude, cloud=q.cloud
    )
    resampling = {
        b: coll.resampling.get(b) or _default_resampling(spec, _source_resolution(items, b), rule, b)
        for b in coll.bands
    }
    applies = q.collections is None or coll.key in q.collections
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
        quality=QualityRules(rule, q.max_cloud if applies else None, q.min_valid if applies else None),
        align=_align_role(spec, coll, rule),
    )


def _default_resampling(spec: PipelineSpec, source_res: float | None, rule: MaskRule | None, band: str) -> str:
    """Class layers are never interpolated (nearest, mode when downsampling); values average when downsampling."""
    down = source_res is not None and source_res < spec.grid.pixel_size * 0.999
    if rule is not None and band == rule.band:
        return "mode" if down else "nearest"
    base = spec.loader.resampling
    return "average" if down and base in ("bilinear", "cubic", "cubic_spline", "lanczos") else base


def _source_resolution(items: Sequence[pystac.Item], band: str) -> float | None:
    for item in items:
        asset = item.assets.get(band)
        if asset is None:
            continue
        transform = asset.extra_fields.get("proj:transform")
        raster = (asset.extra_fields.get("raster:bands") or [{}])[0]
        res = raster.get("spatial_resolution") or asset.extra_fields.get("gsd") or (transform and abs(transform[0]))
        return float(res) if res else None
    return None


def _align_role(spec: PipelineSpec, coll: CollectionSpec, rule: MaskRule | None) -> AlignRole | None:
    """How this collection takes part in co-registration, or None when it does not."""
    align = spec.align
    if align is None or (align.collections is not None and coll.key not in {*align.collections, align.reference}):
        return None
    bands = align.bands.get(coll.key) or [b for b in coll.bands if rule is None or b != rule.band]
    sar = coll.key in align.sar if align.sar is not None else bool(SAR_BANDS & {b.lower() for b in coll.bands})
    return AlignRole(
        reference=coll.key == align.reference,
        bands=tuple(bands),
        modality="sar" if sar else "optical",
        method=align.method,
        max_shift=align.max_shift,
        min_confidence=align.min_confidence,
        resampling=align.resampling,
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


def item_fingerprint(item: pystac.Item, bands: Sequence[str]) -> str:
    """What identifies the content of an item's assets: ``updated``, hrefs, checksums, local file stats.

    Providers re-process scenes under the same id (new baselines, fixed geolocation); they bump
    ``updated`` or ``file:checksum``. For local files the size and modification time stand in.
    """
    parts = [item.id, str(item.properties.get("updated") or item.properties.get("datetime"))]
    for band in bands:
        asset = item.assets.get(band)
        if asset is None:
            continue
        parts += [asset.href, str(asset.extra_fields.get("file:checksum", ""))]
        if asset.href.startswith("file://"):
            try:
                st = os.stat(asset.href.removeprefix("file://"))
                parts += [str(st.st_size), str(st.st_mtime_ns)]
            except OSError:
                parts.append("missing")
    return hashlib.sha1("\x1f".join(parts).encode()).hexdigest()[:16]


def _slot_signature(items: Sequence[dict[str, Any]], fingerprints: dict[tuple[str | None, str], str]) -> str:
    keys = [(it.get("collection"), it["id"]) for it in items]
    return hashlib.sha1(",".join(f"{k[1]}:{fingerprints[k]}" for k in keys).encode()).hexdigest()[:12]


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
    # Per item once, not per chip it touches: footprints (tested against each cell in one vectorised
    # call), acquisition times and solar days.
    footprints = {
        key: np.array([shapely.geometry.shape(it.geometry) for it in its], dtype=object) for key, its in items.items()
    }
    stamps = {key: [pd.Timestamp(it.datetime) for it in its] for key, its in items.items()}
    days = {(it.collection_id, it.id): _solar_day(it) for its in items.values() for it in its}
    fingerprints = {
        (it.collection_id, it.id): item_fingerprint(it, layouts[key].bands) for key, its in items.items() for it in its
    }
    # Serialised once per item, not once per chip it touches: plans ship plain dicts to the workers.
    dicts = {(it.collection_id, it.id): it.to_dict() for its in items.values() for it in its}
    tolerances = _tolerances(spec)
    plans, notes = [], []
    for cell in cells:
        chip_poly = cell.footprint
        grid_ = ChipGrid(cell.crs, cell.x0, cell.y0, cell.size, cell.pixel_size)
        touching = {key: np.flatnonzero(shapely.intersects(fps, chip_poly)) for key, fps in footprints.items()}
        for start, end in spec.windows():
            cid = chip_id(cell.id, start.date(), end.date())
            plan = ChipPlan(cid, cell.id, grid_, chip_poly.wkt, start, end)
            for key, its in items.items():
                hits = [its[i] for i in touching[key] if start <= stamps[key][i] <= end]
                slots = _slots(spec, hits, start, end, dicts, days)
                if len(slots) > layouts[key].n_time and key not in tolerances:
                    notes.append((cid, f"{key}: {len(slots) - layouts[key].n_time} scenes beyond time.max_scenes"))
                    slots = slots[: layouts[key].n_time]
                plan.slots[key] = slots
            plan.slots.update(_match_dates(plan.slots, tolerances))
            plan.inputs = {
                key: [_slot_signature(slot.items, fingerprints) for slot in slots] for key, slots in plan.slots.items()
            }
            if any(plan.slots.values()):
                plans.append(plan)
            else:
                notes.append((cid, "no items intersect this chip"))
    return plans, notes


def _tolerances(spec: PipelineSpec) -> dict[str, pd.Timedelta]:
    """Collections whose dates follow the first collection's (``match_tolerance``, scenes mode only)."""
    if spec.time.mode != "scenes":
        return {}
    return {c.key: pd.Timedelta(c.match_tolerance) for c in spec.source.collections if c.match_tolerance is not None}


def _match_dates(slots: dict[str, list[SlotPlan]], tolerances: dict[str, pd.Timedelta]) -> dict[str, list[SlotPlan]]:
    """Give each matched collection the anchor's time axis: per anchor date, its nearest scene within tolerance.

    The anchor is the first collection without a tolerance; an anchor date with no scene close
    enough gets an empty slot (NaT, nodata), so time step t means the same day in every group.
    """
    anchor = next((key for key in slots if key not in tolerances), None)
    if anchor is None or not tolerances:
        return {}
    matched = {}
    for key, tolerance in tolerances.items():
        own = slots.get(key, [])
        axis = []
        for target in slots[anchor]:
            gaps = [abs(s.time - target.time) for s in own]
            best = int(np.argmin(gaps)) if gaps else -1
            axis.append(own[best] if best >= 0 and gaps[best] <= tolerance else SlotPlan(pd.NaT, ()))
        matched[key] = axis
    return matched


def _slots(
    spec: PipelineSpec,
    hits: list[pystac.Item],
    start: pd.Timestamp,
    end: pd.Timestamp,
    dicts: dict[tuple[str | None, str], dict],
    days: dict[tuple[str | None, str], pd.Timestamp],
) -> list[SlotPlan]:
    if spec.time.mode == "scenes":
        by_day: dict[pd.Timestamp, list[pystac.Item]] = {}
        for item in hits:
            by_day.setdefault(days[item.collection_id, item.id], []).append(item)
        return [
            SlotPlan(
                pd.Timestamp(members[0].datetime).tz_convert("UTC"),
                tuple(dicts[m.collection_id, m.id] for m in members),
            )
            for _, members in sorted(by_day.items())
        ]
    assert spec.time.period is not None
    return [
        SlotPlan(
            a,
            tuple(
                dicts[it.collection_id, it.id]
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
    stored: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """The chip array (time, band, y, x) for one collection, padded with nodata; and read attempts used.

    Reads are retried with exponential backoff and jitter; the last error propagates. The first
    ``plan.reuse[key]`` slots are copied from ``stored`` (the chip as written before) instead of read.
    """
    todo = _to_read(plan, layout, stored)
    out = _start_chip(plan, layout, stored, todo)
    # Scenes: one read for all slots, as an engine's fixed cost per call exceeds a chip window read.
    # Composites: one read per period, so memory holds one period's scenes, not the whole range's.
    if composite:
        batches = [[entry] for entry in todo]
    else:
        batches = [todo] if todo else []
    attempts = 0
    for batch in batches:
        items, where = _unique_items(slot for _, slot in batch)
        scenes, used = _read_with_retries(items, layout, plan.grid, engine, retries, backoff, sleep)
        attempts += used
        for t, slot in batch:
            _fill_slot(out[t], scenes, [where[item["id"]] for item in slot.items], layout, composite)
    return out, max(attempts, 1)


@dataclass
class RowChip:
    """A chip cut out of its row's read, built on demand: a worker builds a shard's chips one by one
    in one reused buffer instead of holding all of them at once."""

    plan: ChipPlan
    layout: CollectionLayout
    cut: np.ndarray
    todo: list[tuple[int, SlotPlan]]
    where: dict[str, int]
    stored: np.ndarray | None

    def build(self, out: np.ndarray | None = None) -> np.ndarray:
        """The chip array, in ``out`` when it has the chip's shape and dtype."""
        chip = _start_chip(self.plan, self.layout, self.stored, self.todo, out)
        for t, slot in self.todo:
            _fill_slot(chip[t], self.cut, [self.where[item["id"]] for item in slot.items], self.layout, False)
        return chip


def read_chip_rows(
    plans: Sequence[ChipPlan],
    layout: CollectionLayout,
    *,
    engine: str,
    stored: Mapping[str, np.ndarray] | None = None,
) -> dict[str, RowChip]:
    """Side-by-side chips, each row of them read as one window, to be built on demand; keyed by chip id.

    An engine's cost per call and per file is paid once per row instead of once per chip (odc-stac
    spends more on that than on the pixels of a 256² chip). Rows hold chips of one CRS whose tops
    are within a quarter chip of each other and that tile the row's window with little waste, so
    the pixels are the ones a per-chip read gives. Chips that are alone in their row, or whose row
    read fails, are left out: `build_chip` reads them one by one, with the retries and the per-chip
    error policy. A row is read once, not retried: a chip that keeps failing then waits for one
    round of retries, not two. As in `build_chip`, the first ``plan.reuse[key]`` slots of a chip are
    copied from its ``stored`` array (by chip id) and only the others are read.
    """
    stored = stored or {}
    todo = {p.id: _to_read(p, layout, stored.get(p.id)) for p in plans}
    out: dict[str, RowChip] = {}
    for row in _chip_rows([p for p in plans if todo[p.id]]):
        first = row[0].grid
        px = first.pixel_size
        left, top = min(p.grid.x0 for p in row), max(p.grid.y0 for p in row)
        bottom = min(p.grid.y0 for p in row) - first.size * px
        right = max(p.grid.x0 for p in row) + first.size * px
        window = ChipGrid(first.crs, left, top, round((right - left) / px), px, height=round((top - bottom) / px))
        items, where = _unique_items(slot for p in row for _, slot in todo[p.id])
        try:
            scenes = _read_layout(items, layout, window, engine)
        except Exception:
            continue
        for p in row:
            r, c = round((top - p.grid.y0) / px), round((p.grid.x0 - left) / px)
            cut = scenes[:, :, r : r + first.size, c : c + first.size]
            out[p.id] = RowChip(p, layout, cut, todo[p.id], where, stored.get(p.id))
    return out


def _chip_rows(plans: Sequence[ChipPlan]) -> list[list[ChipPlan]]:
    """Runs of two or more chips of one CRS and pixel size, side by side along a grid row.

    Chip tops along a grid row step by a few metres (cells follow lon/lat, chips their UTM zone), so
    chips are first banded by top (within a quarter chip), then ordered west to east in each band.
    """
    bands: list[list[ChipPlan]] = []
    for plan in sorted(plans, key=lambda p: (p.grid.crs, p.grid.pixel_size, p.grid.size, -p.grid.y0)):
        g, band = plan.grid, bands[-1] if bands else None
        if band is not None:
            top = band[0].grid
            if (g.crs, g.pixel_size, g.size) == (top.crs, top.pixel_size, top.size) and (
                top.y0 - g.y0 <= g.size * g.pixel_size / 4
            ):
                band.append(plan)
                continue
        bands.append([plan])
    rows: list[list[ChipPlan]] = []
    for band in bands:
        band.sort(key=lambda p: p.grid.x0)
        rows.append([band[0]])
        for plan in band[1:]:
            last, extent = rows[-1][-1].grid, plan.grid.size * plan.grid.pixel_size
            if abs(plan.grid.x0 - (last.x0 + extent)) <= extent / 4:
                rows[-1].append(plan)
            else:
                rows.append([plan])
    return [row for row in rows if len(row) > 1]


def _reused(plan: ChipPlan, layout: CollectionLayout, stored: np.ndarray | None) -> int:
    """Leading slots copied from the stored chip instead of read (none without a stored chip)."""
    return plan.reuse.get(layout.key, 0) if stored is not None else 0


def _to_read(plan: ChipPlan, layout: CollectionLayout, stored: np.ndarray | None) -> list[tuple[int, SlotPlan]]:
    """The time slots of a chip that have items and are not reused."""
    reuse = _reused(plan, layout, stored)
    return [(t, slot) for t, slot in enumerate(plan.slots.get(layout.key, [])) if t >= reuse and slot.items]


def _start_chip(
    plan: ChipPlan,
    layout: CollectionLayout,
    stored: np.ndarray | None,
    todo: Sequence[tuple[int, SlotPlan]],
    out: np.ndarray | None = None,
) -> np.ndarray:
    """A chip (in ``out`` if it fits) with its reused slots copied from ``stored`` and nodata in the
    slots nothing will be read into.

    The slots in ``todo`` are left unset: their reads write every pixel, and a chip is MBs, so not
    filling it first saves a pass over it.
    """
    shape, dtype = _chip_shape(plan, layout), np.dtype(layout.dtype)
    if out is None or out.shape != shape or out.dtype != dtype:
        out = np.empty(shape, dtype=dtype)
    reuse = _reused(plan, layout, stored)
    if reuse:
        out[:reuse] = stored[:reuse]
    read = {t for t, _ in todo}
    for t in range(reuse, layout.n_time):
        if t not in read:
            out[t] = layout.nodata
    return out


def empty_chip(plan: ChipPlan, layout: CollectionLayout) -> np.ndarray:
    """A chip of nodata: what an unread time step, or a skipped chip, holds."""
    return np.full(_chip_shape(plan, layout), layout.nodata, dtype=np.dtype(layout.dtype))


def _chip_shape(plan: ChipPlan, layout: CollectionLayout) -> tuple[int, int, int, int]:
    """(time, band, y, x) of one collection's chip."""
    return (layout.n_time, len(layout.bands), plan.grid.size, plan.grid.size)


def _unique_items(slots: Iterable[SlotPlan]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Each item of the slots once, and where it is in that list."""
    where: dict[str, int] = {}
    items: list[dict[str, Any]] = []
    for slot in slots:
        for item in slot.items:
            if item["id"] not in where:
                where[item["id"]] = len(items)
                items.append(item)
    return items, where


def _read_layout(items: Sequence[dict[str, Any]], layout: CollectionLayout, grid: ChipGrid, engine: str) -> np.ndarray:
    """The collection's bands of ``items`` on ``grid``, in its dtype, nodata and resampling."""
    return read_items(
        items,
        layout.bands,
        grid,
        dtype=np.dtype(layout.dtype),
        nodata=layout.nodata,
        engine=engine,
        resampling=layout.resampling,
    )


def _read_with_retries(
    items: Sequence[dict[str, Any]],
    layout: CollectionLayout,
    grid: ChipGrid,
    engine: str,
    retries: int,
    backoff: float,
    sleep: Callable[[float], None],
) -> tuple[np.ndarray, int]:
    attempt = 0
    while True:
        try:
            return _read_layout(items, layout, grid, engine), attempt + 1
        except Exception:
            if attempt == retries:
                raise
            sleep(backoff * 2**attempt * (0.5 + random.random()))
            attempt += 1


def _fill_slot(
    dst: np.ndarray, scenes: np.ndarray, picked: list[int], layout: CollectionLayout, composite: bool
) -> None:
    """One time step from its scenes: their median of clear pixels, or the first valid pixel of each."""
    if composite:
        dst[...] = _median_of_clear(scenes[picked], layout)
    elif len(picked) == 1:
        dst[...] = scenes[picked[0]]
    else:
        dst[...] = _first_valid(scenes[picked], layout.nodata)


def _first_valid(scenes: np.ndarray, nodata: float) -> np.ndarray:
    """Mosaic same-day scenes: each pixel from the first scene that has data there."""
    out = scenes[0]
    for scene in scenes[1:]:
        hole = is_nodata(out, nodata)
        out[hole] = scene[hole]
    return out


def _mask_rule(layout: CollectionLayout) -> MaskRule | None:
    return layout.quality.mask if layout.quality is not None else None


def _median_of_clear(scenes: np.ndarray, layout: CollectionLayout) -> np.ndarray:
    """Per-pixel median of the scenes where the pixel is valid and not flagged by the quality band."""
    bad = is_nodata(scenes, layout.nodata).any(axis=1)
    rule = _mask_rule(layout)
    if rule is not None:
        bad |= rule.unusable(scenes[:, layout.bands.index(rule.band)])
    values = np.where(bad[:, None], np.nan, scenes.astype(np.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(values, axis=0)
    if rule is not None:
        k = layout.bands.index(rule.band)
        median[k] = np.where(bad.all(axis=0), layout.nodata, _mode_of_clear(scenes[:, k], bad))
    median = np.where(np.isnan(median), layout.nodata, median)
    dtype = np.dtype(layout.dtype)
    return np.round(median).astype(dtype) if dtype.kind in "iu" else median.astype(dtype)


def _mode_of_clear(scl: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """A class layer is composited by taking the class of the first clear scene, never by averaging."""
    first_clear = np.argmax(~bad, axis=0)
    return np.take_along_axis(scl, first_clear[None], axis=0)[0]


def chip_quality(chip: np.ndarray, layout: CollectionLayout) -> tuple[float, float]:
    """Valid fraction (pixels with data in all bands, over filled slots) and cloud fraction (of valid pixels).

    The cloud fraction counts the ``quality.cloud`` flags of the collection's quality band (SCL,
    QA_PIXEL); it is NaN for collections without one.
    """
    # Band plane by band plane: reductions over the band axis of the whole chip cost several times more.
    holes = is_nodata(chip[:, 0], layout.nodata)
    empty = holes.copy()
    for k in range(1, chip.shape[1]):
        plane = is_nodata(chip[:, k], layout.nodata)
        holes |= plane
        empty &= plane
    filled = ~empty.all(axis=(1, 2))
    if not filled.any():
        return 0.0, float("nan")
    valid = ~holes[filled]
    cloud = float("nan")
    rule = _mask_rule(layout)
    if rule is not None and valid.any():
        cloud = float(rule.cloudy(chip[filled, layout.bands.index(rule.band)])[valid].mean())
    return float(valid.mean()), cloud


def quality_verdict(
    valid_fraction: dict[str, float], cloud_fraction: dict[str, float], layouts: dict[str, CollectionLayout]
) -> str | None:
    """Why a chip is dropped under the spec's ``quality`` thresholds (first failing collection), or None."""
    for key, layout in layouts.items():
        if layout.quality is None:
            continue
        reason = layout.quality.verdict(key, valid_fraction.get(key, 0.0), cloud_fraction.get(key, float("nan")))
        if reason is not None:
            return reason
    return None
