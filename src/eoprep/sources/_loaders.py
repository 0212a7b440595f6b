"""Read the pixels of STAC items onto one chip grid, inside a worker task.

Two engines behind one function: odc-stac (default) and stackstac. Both are called eagerly on the
chip's grid (no Dask graph of their own): DESIGN.md measured that their default fine-grained
graphs reach only 0.11–0.20 of the raw read bound, while one coarse task per chip reaches 0.9.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ChipGrid", "is_nodata", "read_items", "warm_up_readers"]


@dataclass(frozen=True)
class ChipGrid:
    """The pixel grid of one chip (square: ``size`` pixels a side), north-up, in a projected CRS.

    A ``height`` makes it a ``height`` × ``size`` window: the grid of a row of side-by-side chips
    that are read in one go.
    """

    crs: str
    x0: float
    y0: float
    size: int
    pixel_size: float
    height: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """Rows and columns."""
        return (self.height or self.size, self.size)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        rows, cols = self.shape
        return (self.x0, self.y0 - rows * self.pixel_size, self.x0 + cols * self.pixel_size, self.y0)

    def geobox(self) -> Any:
        from odc.geo.geobox import GeoBox

        return GeoBox.from_bbox(self.bounds, crs=self.crs, resolution=self.pixel_size)


#: A minimal item in the form the pipeline's sources have (STAC 1.1, proj/raster/eo extensions), for `warm_up_readers`.
_WARM_UP_ITEM: dict[str, Any] = {
    "type": "Feature",
    "stac_version": "1.1.0",
    "stac_extensions": [
        "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
        "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
        "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
    ],
    "id": "eoprep-warm-up",
    "geometry": {"type": "Polygon", "coordinates": [[[9, 45], [9.1, 45], [9.1, 45.1], [9, 45.1], [9, 45]]]},
    "bbox": [9, 45, 9.1, 45.1],
    "properties": {"datetime": "2024-01-01T00:00:00Z", "proj:code": "EPSG:32632"},
    "links": [],
    "assets": {
        "B02": {
            "href": "file:///eoprep-warm-up/B02.tif",
            "type": "image/tiff; application=geotiff; profile=cloud-optimized",
            "roles": ["data"],
            "proj:shape": [1000, 1000],
            "proj:transform": [10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0],
            "raster:bands": [{"nodata": 0, "data_type": "uint16"}],
        }
    },
}


def warm_up_readers() -> None:
    """Parse an item once as a worker starts: the first parse in a process has pystac look up its
    extension hooks in every installed package's entry points (0.05-0.08 s in a Dask worker), which
    each worker's first shard used to wait for."""
    import pystac
    from odc.stac import parse_items

    list(parse_items([pystac.Item.from_dict(_WARM_UP_ITEM)]))


def read_items(
    items: Sequence[dict[str, Any]],
    bands: Sequence[str],
    grid: ChipGrid,
    *,
    dtype: np.dtype,
    nodata: float,
    engine: str = "odc-stac",
    resampling: str | dict[str, str] = "nearest",
) -> np.ndarray:
    """Pixels of each item on the chip grid, shaped (item, band, y, x), in the order given.

    Raises whatever the engine raises on a failed read: the caller owns retries and error policy.
    """
    if not items:
        return np.full((0, len(bands), *grid.shape), nodata, dtype=dtype)
    if engine == "earthengine" or str(next(iter(items[0]["assets"].values()))["href"]).startswith("ee://"):
        from eoprep.sources._earthengine import read_earthengine

        return read_earthengine(items, bands, grid, dtype=dtype, nodata=nodata)
    reader = _ENGINES.get(engine)
    if reader is None:
        raise ValueError(f"loader.engine: unknown engine {engine!r} (use {', '.join(_ENGINES)})")
    return reader(items, bands, grid, dtype, nodata, resampling)


def _read_odc(
    items: Sequence[dict[str, Any]],
    bands: Sequence[str],
    grid: ChipGrid,
    dtype: np.dtype,
    nodata: float,
    resampling: str | dict[str, str],
) -> np.ndarray:
    """odc-stac reads: bands on the chip grid, except bands whose source pixels nest in it.

    A nearest-neighbour band whose source grid is the chip grid coarsened by an integer factor (a
    20 m band under 10 m chips) is read on that source grid and its pixels are replicated: the
    same pixels as odc-stac's warp onto the chip grid, without GDAL's warper, which costs odc-stac
    more than reading the band.
    """
    from eoprep.sources._odc_reader import load_odc

    nested = _nested_bands(items, bands, grid, resampling)
    loads: dict[tuple[int, int, int], list[str]] = {(1, 0, 0): [b for b in bands if b not in nested]}
    for band, nest in nested.items():
        loads.setdefault(nest, []).append(band)
    out = np.empty((len(items), len(bands), *grid.shape), dtype=dtype)
    for (ratio, dy, dx), group in loads.items():
        if not group:
            continue
        if ratio == 1:
            band_nodata = load_odc(items, group, grid.geobox(), resampling, out, [bands.index(b) for b in group])
            for band in group:
                _fill_nodata(out[:, bands.index(band)], band_nodata[band], nodata)
            continue
        geobox = _coarse_geobox(grid, ratio, dy, dx)
        coarse = np.empty((len(items), len(group), *geobox.shape.yx), dtype=dtype)
        band_nodata = load_odc(items, group, geobox, resampling, coarse, list(range(len(group))))
        for j, band in enumerate(group):
            values = _fill_nodata(coarse[:, j], band_nodata[band], nodata)
            _replicate_into(out[:, bands.index(band)], values, ratio, dy, dx)
    return out


def _nested_bands(
    items: Sequence[dict[str, Any]], bands: Sequence[str], grid: ChipGrid, resampling: str | dict[str, str]
) -> dict[str, tuple[int, int, int]]:
    """Bands read by nearest neighbour whose source grid, in every item, is the chip grid coarsened by an
    integer factor: band → (factor, row and column of the chip's first pixel inside its source pixel)."""
    nested = {}
    for band in bands:
        method = resampling.get(band, "nearest") if isinstance(resampling, dict) else resampling
        if method != "nearest":
            continue
        nests = {_nest(item, band, grid) for item in items}
        if len(nests) == 1 and (nest := nests.pop()) is not None and nest[0] > 1:
            nested[band] = nest
    return nested


def _nest(item: dict[str, Any], band: str, grid: ChipGrid) -> tuple[int, int, int] | None:
    """How the chip grid sits in the asset's pixel grid (factor, row, column offsets), or None if it does not nest."""
    asset, props = item["assets"].get(band, {}), item.get("properties", {})
    transform = asset.get("proj:transform") or props.get("proj:transform")
    code = asset.get("proj:code") or props.get("proj:code")
    epsg = asset.get("proj:epsg") or props.get("proj:epsg")
    steps = None if transform is None else _grid_steps(transform, code or (f"EPSG:{epsg}" if epsg else None), grid)
    if steps is None:
        return None
    ratio, x_px, y_px = steps
    return ratio, y_px % ratio, x_px % ratio


def _grid_steps(transform: Sequence[float], crs: str | None, grid: ChipGrid) -> tuple[int, int, int] | None:
    """(source pixel size, chip's left edge and top edge from the source origin), all in chip pixels, when
    the chip grid nests in the source grid: same CRS, north-up, whole numbers. None otherwise."""
    if crs is None or str(crs).upper() != grid.crs.upper():
        return None
    a, b, c, d, e, f = (float(v) for v in list(transform)[:6])
    if b != 0 or d != 0 or abs(a + e) > 1e-9 or a <= 0:
        return None
    steps = (a / grid.pixel_size, (grid.x0 - c) / grid.pixel_size, (f - grid.y0) / grid.pixel_size)
    if not all(abs(v - round(v)) < 1e-6 for v in steps) or round(steps[0]) < 1:
        return None
    ratio, x_px, y_px = (round(v) for v in steps)
    return ratio, x_px, y_px


def _coarse_geobox(grid: ChipGrid, ratio: int, dy: int, dx: int) -> Any:
    """The source-resolution grid whose pixels cover the chip, aligned with the source pixels."""
    from affine import Affine
    from odc.geo.geobox import GeoBox

    rows, cols = grid.shape
    step = grid.pixel_size * ratio
    transform = Affine(step, 0.0, grid.x0 - dx * grid.pixel_size, 0.0, -step, grid.y0 + dy * grid.pixel_size)
    return GeoBox((-(-(rows + dy) // ratio), -(-(cols + dx) // ratio)), transform, grid.crs)


def _replicate_into(dst: np.ndarray, values: np.ndarray, ratio: int, dy: int, dx: int) -> None:
    """Fill ``dst`` (scene, y, x) with source pixels ``values`` repeated ``ratio`` times each way, the chip's
    first pixel being pixel (dy, dx) of the first source pixel: one strided copy per position in a source pixel."""
    rows, cols = dst.shape[-2:]
    for a in range(ratio):
        y0, ny = (a + dy) // ratio, len(range(a, rows, ratio))
        for b in range(ratio):
            x0, nx = (b + dx) // ratio, len(range(b, cols, ratio))
            dst[:, a::ratio, b::ratio] = values[:, y0 : y0 + ny, x0 : x0 + nx]


def _fill_nodata(values: np.ndarray, band_nodata: float | None, nodata: float) -> np.ndarray:
    """Make a band's own nodata the collection's single fill value (in place)."""
    if band_nodata is not None and not _same(band_nodata, nodata):
        values[is_nodata(values, band_nodata)] = nodata
    return values


def _same(a: float, b: float) -> bool:
    return bool(a == b or (np.isnan(a) and np.isnan(b)))


def is_nodata(values: np.ndarray, nodata: float) -> np.ndarray:
    """Where ``values`` hold ``nodata``; NaN counts as equal to a NaN nodata."""
    return np.isnan(values) if np.isnan(nodata) else values == nodata


def _read_stackstac(
    items: Sequence[dict[str, Any]],
    bands: Sequence[str],
    grid: ChipGrid,
    dtype: np.dtype,
    nodata: float,
    resampling: str | dict[str, str],
) -> np.ndarray:
    import stackstac
    from rasterio.enums import Resampling

    if isinstance(resampling, dict):
        methods = set(resampling.values())
        if len(methods) > 1:
            raise ValueError("the stackstac loader takes one resampling for all bands; use odc-stac for per-band")
        resampling = methods.pop() if methods else "nearest"
    arr = stackstac.stack(
        [_with_epsg(item) for item in items],
        assets=list(bands),
        epsg=int(grid.crs.split(":")[1]),
        bounds=grid.bounds,
        resolution=grid.pixel_size,
        snap_bounds=False,
        dtype=dtype,
        fill_value=dtype.type(nodata),
        rescale=False,
        xy_coords="center",
        sortby_date=False,
        properties=False,
        band_coords=False,
        chunksize=max(grid.shape),
        resampling=Resampling[resampling],
    )
    try:
        return np.asarray(arr.data.compute(scheduler="synchronous"))
    except AssertionError as exc:
        if "Empty reader_table" not in str(exc):
            raise
        # stackstac drops assets that miss the bounds, and asserts when none is left: a chip off the scenes.
        return np.full((len(items), len(bands), *grid.shape), nodata, dtype=dtype)


def _with_epsg(item: dict[str, Any]) -> dict[str, Any]:
    """Add the ``proj:epsg`` stackstac needs to items that only carry ``proj:code`` (STAC projection v2)."""
    props = item["properties"]
    code = props.get("proj:code")
    if props.get("proj:epsg") is not None or not (isinstance(code, str) and code.upper().startswith("EPSG:")):
        return item
    return {**item, "properties": {**props, "proj:epsg": int(code.split(":")[1])}}


_handles = threading.local()
#: Open files per thread; GDAL's block cache (``GDAL_CACHEMAX``) bounds the memory, not this.
_MAX_OPEN = 256


def _local_path(href: str) -> str | None:
    """The file path of a local asset href (plain or ``file://``); None for a remote or GDAL /vsi one."""
    path = href.removeprefix("file://")
    return None if "://" in path or path.startswith("/vsi") else path


def _open_cached(href: str) -> tuple[Any, int | None]:
    """A rasterio dataset per (thread, file), kept open, and the EPSG code of its CRS.

    Opening a COG costs more than reading a chip window, and closing it drops GDAL's cache of its
    decoded blocks. A local file is opened again when its modification time or size changed (a file
    rewritten in place); a remote one is kept as opened.
    """
    import rasterio

    local = _local_path(href)
    path, stamp = local or href, None
    if local is not None:
        try:
            stat = os.stat(local)
            stamp = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            pass  # rasterio's open raises its own error, naming the file
    cache: OrderedDict[str, tuple[tuple[int, int] | None, Any, int | None]] = _handles.__dict__.setdefault(
        "cache", OrderedDict()
    )
    found = cache.get(path)
    if found is not None and found[0] == stamp:
        cache.move_to_end(path)
        return found[1], found[2]
    if found is not None:
        found[1].close()
    handle = rasterio.open(path)
    epsg = handle.crs.to_epsg() if handle.crs is not None else None
    cache[path] = (stamp, handle, epsg)
    while len(cache) > _MAX_OPEN:
        cache.popitem(last=False)[1][1].close()
    return handle, epsg


def _read_rasterio(
    items: Sequence[dict[str, Any]],
    bands: Sequence[str],
    grid: ChipGrid,
    dtype: np.dtype,
    nodata: float,
    resampling: str | dict[str, str],
) -> np.ndarray:
    """Windowed reads with cached handles; a warped VRT only where the source grid does not line up.

    Every read writes all pixels of its plane (nodata where the source has none), so the output is
    not pre-filled: a row of chips is tens of MB, and filling it first costs a full extra pass.
    """
    out = np.empty((len(items), len(bands), *grid.shape), dtype=dtype)
    for i, item in enumerate(items):
        for k, band in enumerate(bands):
            method = resampling.get(band, "nearest") if isinstance(resampling, dict) else resampling
            src, _ = _open_cached(item["assets"][band]["href"])
            if not _read_aligned(src, grid, method, out[i, k], nodata):
                _read_warped(src, grid, method, out[i, k], nodata)
    return out


def _paste(dst: np.ndarray, block: np.ma.MaskedArray | np.ndarray, src_nodata: float | None, nodata: float) -> None:
    """Write ``block`` over all of ``dst``, its invalid pixels as ``nodata``."""
    if isinstance(block, np.ma.MaskedArray):
        dst[...] = block.data
        dst[np.ma.getmaskarray(block)] = nodata
    elif _nodata_is_ours(src_nodata, nodata):
        dst[...] = block  # no mask needed
    else:
        dst[...] = block
        dst[is_nodata(block, src_nodata)] = nodata


def _nodata_is_ours(src_nodata: float | None, nodata: float) -> bool:
    return src_nodata is None or _same(float(src_nodata), float(nodata))


def _fill_outside(dst: np.ndarray, rows: slice, cols: slice, nodata: float) -> None:
    """Fill ``dst`` with nodata outside the rectangle ``rows`` x ``cols``."""
    dst[: rows.start] = nodata
    dst[rows.stop :] = nodata
    dst[rows, : cols.start] = nodata
    dst[rows, cols.stop :] = nodata


def _nodata_only(src: Any) -> bool:
    """The band's validity is its nodata value (or everything is valid): no mask band to read."""
    from rasterio.enums import MaskFlags

    return set(src.mask_flag_enums[0]) <= {MaskFlags.nodata, MaskFlags.all_valid}


def _read_aligned(src: Any, grid: ChipGrid, method: str, dst: np.ndarray, nodata: float) -> bool:
    """Read the chip from the source's own pixel grid when no warp is needed; False when one is.

    That is the case when the CRS matches, the source pixel is an integer multiple of the chip pixel
    and the chip's edges fall on chip-pixel steps of the source grid: then a windowed read, upsampled
    by pixel replication, equals a nearest-neighbour warp. Other resampling methods only take this
    path when no resampling happens at all (same pixel size, whole-pixel offset).
    """
    from rasterio.enums import Resampling
    from rasterio.windows import Window

    steps = _grid_steps(tuple(src.transform)[:6], src.crs.to_string() if src.crs else None, grid)
    if steps is None:
        return False
    ratio, x_px, y_px = steps
    if method != "nearest" and (ratio != 1):
        return False
    c0, r0 = max(x_px // ratio, 0), max(y_px // ratio, 0)
    rows, cols = grid.shape
    c1 = min(-(-(x_px + cols) // ratio), src.width)
    r1 = min(-(-(y_px + rows) // ratio), src.height)
    if c0 >= c1 or r0 >= r1:
        dst.fill(nodata)
        return True
    window = Window(c0, r0, c1 - c0, r1 - r0)
    height, width = (r1 - r0) * ratio, (c1 - c0) * ratio
    # the window covers chip pixels [ys0, ys0 + height) x [xs0, xs0 + width); the chip keeps what falls inside
    ys0, xs0 = r0 * ratio - y_px, c0 * ratio - x_px
    inside = (slice(max(ys0, 0), min(ys0 + height, rows)), slice(max(xs0, 0), min(xs0 + width, cols)))
    _fill_outside(dst, *inside, nodata)
    masked = not _nodata_only(src)
    whole = inside == (slice(ys0, ys0 + height), slice(xs0, xs0 + width))
    if whole and not masked and src.dtypes[0] == dst.dtype and _nodata_is_ours(src.nodata, nodata):
        src.read(1, window=window, out=dst[inside], resampling=Resampling[method])  # straight into the chip
        return True
    block = src.read(1, window=window, masked=masked, out_shape=(height, width), resampling=Resampling[method])
    crop = (slice(inside[0].start - ys0, inside[0].stop - ys0), slice(inside[1].start - xs0, inside[1].stop - xs0))
    _paste(dst[inside], block[crop], src.nodata, nodata)
    return True


def _read_warped(src: Any, grid: ChipGrid, method: str, dst: np.ndarray, nodata: float) -> None:
    from affine import Affine
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    transform = Affine(grid.pixel_size, 0.0, grid.x0, 0.0, -grid.pixel_size, grid.y0)
    with WarpedVRT(
        src, crs=grid.crs, transform=transform, width=grid.shape[1], height=grid.shape[0], resampling=Resampling[method]
    ) as vrt:
        _paste(dst, vrt.read(1, masked=True), None, nodata)


_ENGINES: dict[str, Callable[..., np.ndarray]] = {
    "odc-stac": _read_odc,
    "stackstac": _read_stackstac,
    "rasterio": _read_rasterio,
}
