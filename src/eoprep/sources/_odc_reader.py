"""odc-stac loads straight into the chip array, with local files kept open in each worker thread.

`load_odc` is the part of ``odc.stac.load`` a chip needs, from the same public pieces: odc-stac
parses the items (band aliases, per-band nodata and dtype, footprints) and odc-loader's reader
driver reads each item's band onto the grid. It skips what a chip does not use and what cost a
loaded row more than its reads: parsing the same items again for every row (parsed items are
kept per worker), binning items into time slots and tiles, an xarray Dataset per load, and a
copy of every plane from that Dataset into the chip. One item is one time slot, as with
``groupby="id"``, so nothing is fused.

odc-stac's rasterio reader opens a file for every read and closes it afterwards. Closing drops GDAL's
cache of decoded blocks, so the next chip row decodes the same COG tiles again, and each open costs
about a millisecond of header parsing. `_read_odc` only asks for grids that line up with the
source pixels (the chip grid, or a band's own coarser grid), where a read is a window copy: this
driver copies such windows from a cached handle. Everything else (reprojection, remote files,
subdatasets) goes to odc-stac's own reader, unchanged.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
from odc.loader import (
    RasterLoadParams,
    RasterSource,
    RioDriver,
    RioReader,
    resolve_dst_dtype,
    resolve_dst_nodata,
    resolve_load_cfg,
    resolve_src_nodata,
)
from odc.stac import ParsedItem, parse_items
from rasterio.errors import RasterioIOError
from rasterio.windows import Window

from eoprep.sources._loaders import ChipGrid, _fill_outside, _grid_steps, _local_path, _open_cached, _same, is_nodata

__all__ = ["CachedRioDriver", "load_odc"]

#: Parsed item lists kept per worker process: the rows of a shard, and the shards of a run, share their scenes.
MAX_PARSED = 64
#: odc-stac's tile size for loads without Dask: a read never covers more than this many pixels a side.
TILE = 2048

_parsed_lock = threading.Lock()
_parsed: OrderedDict[tuple[bytes, ...], tuple[list[ParsedItem], dict[str, list[Any]]]] = OrderedDict()


def load_odc(
    items: Sequence[dict[str, Any]],
    bands: Sequence[str],
    geobox: Any,
    resampling: str | dict[str, str],
    out: np.ndarray,
    columns: Sequence[int],
) -> dict[str, float | None]:
    """Read every item's ``bands`` onto ``geobox`` into ``out[item, columns[band]]``, as odc-stac would in
    ``out``'s dtype.

    Each plane gets all its pixels: odc-stac's fill value where the item has no data. Returns each
    band's nodata as odc-stac reports it (its ``nodata`` attribute). Read errors are raised.
    """
    from odc.geo.geobox import GeoboxTiles

    parsed, footprints = _parse(items)
    cfgs = resolve_load_cfg(parsed[0].collection.resolve_bands(list(bands)), resampling, dtype=out.dtype.name)
    crs = str(geobox.crs)
    if crs not in footprints:
        footprints[crs] = [_footprint(item, geobox.crs) for item in parsed]
    tiles = GeoboxTiles(geobox, (TILE, TILE))
    driver = CachedRioDriver()
    with driver.restore_env(driver.capture_env(), driver.new_load(geobox)) as ctx:
        for i, (item, footprint) in enumerate(zip(parsed, footprints[crs], strict=True)):
            touched = list(tiles.tiles(footprint))
            sources = item.resolve_bands(list(bands))
            for j, band in enumerate(bands):
                cfg, dst = cfgs[band], out[i, columns[j]]
                fill = resolve_dst_nodata(dst.dtype, cfg, resolve_src_nodata(cfg.fill_value, cfg))
                fill = dst.dtype.type(0) if fill is None else fill  # odc-stac's start value where nodata is unset
                src = sources.get(band)
                if src is None or not touched:
                    dst.fill(fill)
                    continue
                reader = driver.open(src, ctx)
                if len(touched) < tiles.shape[0] * tiles.shape[1]:
                    dst.fill(fill)
                for tile in touched:
                    part = dst[tiles.roi[tile]]
                    roi, _ = reader.read(cfg, tiles[tile], dst=part)
                    _fill_outside(part, *_whole(roi, part.shape), fill)
    return {band: cfgs[band].fill_value for band in bands}


def _parse(items: Sequence[dict[str, Any]]) -> tuple[list[ParsedItem], dict[str, list[Any]]]:
    """odc-stac's parse of the items (one call for the list, as ``odc.stac.load`` does), kept per process,
    with a slot for their footprints per CRS."""
    import pystac

    key = tuple(hashlib.blake2b(pickle.dumps(item, 5), digest_size=16).digest() for item in items)
    with _parsed_lock:
        found = _parsed.get(key)
        if found is not None:
            _parsed.move_to_end(key)
            return found
    parsed = list(parse_items(pystac.Item.from_dict(item) for item in items))
    with _parsed_lock:
        found = _parsed.setdefault(key, (parsed, {}))
        while len(_parsed) > MAX_PARSED:
            _parsed.popitem(last=False)
    return found


def _footprint(item: ParsedItem, crs: Any) -> Any:
    geometry = item.safe_geometry(crs)
    if geometry is None:
        raise ValueError(f"item {item.id}: no footprint (neither proj metadata nor geometry)")
    return geometry


def _whole(roi: tuple[slice, slice], shape: tuple[int, ...]) -> tuple[slice, slice]:
    """``roi`` with open ends closed, so it can bound a fill."""
    rows, cols = (slice(s.start or 0, shape[k] if s.stop is None else s.stop) for k, s in enumerate(roi))
    return rows, cols


class CachedRioDriver(RioDriver):
    """odc-stac's `RioDriver` whose readers paste aligned windows from handles kept open per thread."""

    def open(self, src: RasterSource, ctx: Any) -> RioReader:
        return _CachedRioReader(src, ctx)


class _CachedRioReader(RioReader):
    def __init__(self, src: RasterSource, ctx: Any) -> None:
        super().__init__(src, ctx)
        self._source = src

    def read(
        self,
        cfg: RasterLoadParams,
        dst_geobox: Any,
        *,
        dst: np.ndarray | None = None,
        selection: Any = None,
    ) -> tuple[tuple[slice, slice], np.ndarray]:
        src = self._source
        opened = _handle(src.uri) if selection is None and src.subdataset is None else None
        rois = _aligned_rois(*opened, dst_geobox) if opened is not None else None
        if rois is None:
            return super().read(cfg, dst_geobox, dst=dst, selection=selection)
        handle = opened[0]
        (src_rows, src_cols), roi = rois
        shape = (roi[0].stop - roi[0].start, roi[1].stop - roi[1].start)
        out = dst[roi] if dst is not None else np.empty(shape, resolve_dst_dtype(handle.dtypes[src.band - 1], cfg))
        window = Window(src_cols.start, src_rows.start, shape[1], shape[0])
        handle.read(src.band, out=out, window=window)
        src_nodata = resolve_src_nodata(handle.nodatavals[src.band - 1], cfg)
        dst_nodata = resolve_dst_nodata(out.dtype, cfg, src_nodata)
        if dst_nodata is not None and src_nodata is not None and not _same(src_nodata, dst_nodata):
            np.copyto(out, dst_nodata, where=is_nodata(out, src_nodata))
        return roi, out


def _handle(uri: str) -> tuple[Any, int | None] | None:
    """An open dataset and its EPSG code for a local file (the loaders' per-thread cache); None for anything
    else, and for a file that does not open, whose error odc-stac's own reader then raises."""
    path = _local_path(uri)
    if path is None:
        return None
    try:
        return _open_cached(path)
    except RasterioIOError:
        return None


def _aligned_rois(
    handle: Any, epsg: int | None, dst_geobox: Any
) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """(source rows and columns, destination rows and columns) when the destination grid is the file's grid
    shifted by whole pixels and overlaps it; None when the read needs a warp or reads nothing."""
    d = dst_geobox.transform
    if epsg is None or dst_geobox.crs is None or d.b or d.d or not math.isclose(d.e, -d.a, rel_tol=1e-9):
        return None
    height, width = dst_geobox.shape
    grid = ChipGrid(f"EPSG:{dst_geobox.crs.epsg}", d.c, d.f, width, d.a, height=height)
    steps = _grid_steps(tuple(handle.transform)[:6], f"EPSG:{epsg}", grid)
    if steps is None or steps[0] != 1:
        return None
    _, col, row = steps
    rows = slice(max(row, 0), min(row + height, handle.height))
    cols = slice(max(col, 0), min(col + width, handle.width))
    if rows.start >= rows.stop or cols.start >= cols.stop:
        return None
    return (rows, cols), (slice(rows.start - row, rows.stop - row), slice(cols.start - col, cols.stop - col))
