"""Our odc-stac load and reader driver give exactly what ``odc.stac.load`` gives, from handles kept open."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import rasterio
from pyproj import Transformer

from eoprep.grid import GlobalGrid
from eoprep.sources import ChipGrid, read_items
from eoprep.sources._loaders import _handles
from eoprep.sources._odc_reader import CachedRioDriver, _handle

odc_stac = pytest.importorskip("odc.stac")
pystac = pytest.importorskip("pystac")


def _load_dataset(items, bands, geobox, dtype, driver=None, resampling="nearest"):
    return odc_stac.load(
        [pystac.Item.from_dict(i) for i in items],
        bands=bands,
        geobox=geobox,
        chunks=None,
        groupby="id",
        resampling=resampling,
        dtype=dtype,
        preserve_original_order=True,
        driver=driver,
    )


def _load(items, bands, geobox, dtype, driver=None):
    ds = _load_dataset(items, bands, geobox, dtype, driver)
    return np.stack([ds[b].values for b in bands], axis=1)


@pytest.mark.parametrize(
    ("collection", "bands", "dtype"),
    [
        ("demo-sentinel-2-l2a", ["B02", "SCL"], "uint16"),
        ("demo-sentinel-2-l2a", ["B04"], "float32"),  # nodata 0 becomes NaN, as odc-stac does it
        ("demo-sentinel-1-rtc", ["vv", "vh"], "float32"),
    ],
)
def test_cached_driver_matches_odc_stac_on_aligned_grids_and_scene_edges(demo_archive, collection, bands, dtype):
    items = [i for i in demo_archive.items if i["collection"] == collection][:3]
    grid = GlobalGrid(cell_size=1280, pixel_size=10)
    cells = grid.cells_in_bbox((8.95, 45.37, 9.11, 45.48))
    _handles.__dict__.pop("cache", None)
    partial = False
    for cell in cells[:: max(1, len(cells) // 10)]:
        geobox = ChipGrid(cell.crs, cell.x0, cell.y0, cell.size, cell.pixel_size).geobox()
        want = _load(items, bands, geobox, dtype)
        got = _load(items, bands, geobox, dtype, driver=CachedRioDriver())
        np.testing.assert_array_equal(got, want, err_msg=cell.id)
        empty = np.isnan(want) | (want == 0)
        partial |= bool(empty.any() and not empty.all())
    assert partial, "no chip crossed a scene edge"
    kept = set(_handles.cache)
    assert {i["assets"][b]["href"].removeprefix("file://") for i in items for b in bands} <= kept, (
        "reads bypassed the cache"
    )


def test_grids_that_need_a_warp_go_to_odc_stac(demo_archive):
    items = [i for i in demo_archive.items if i["collection"] == "demo-sentinel-2-l2a"][:2]
    x, y = Transformer.from_crs(4326, 32631, always_xy=True).transform(9.03, 45.43)
    geobox = ChipGrid("EPSG:32631", round(x / 10) * 10, round(y / 10) * 10, 64, 10.0).geobox()
    want = _load(items, ["B04"], geobox, "uint16")
    assert (want > 0).all()
    np.testing.assert_array_equal(_load(items, ["B04"], geobox, "uint16", driver=CachedRioDriver()), want)


def test_a_file_rewritten_in_place_is_read_again(demo_archive, tmp_path):
    item = next(i for i in demo_archive.items if i["collection"] == "demo-sentinel-2-l2a")
    path = tmp_path / "B04.tif"
    shutil.copy(item["assets"]["B04"]["href"].removeprefix("file://"), path)
    first, _ = _handle(f"file://{path}")
    assert _handle(str(path))[0] is first, "the handle is not kept"
    with rasterio.open(path, "r+", IGNORE_COG_LAYOUT_BREAK="YES") as dst:
        dst.write(np.full((dst.height, dst.width), 7, dtype=dst.dtypes[0]), 1)
    again, _ = _handle(str(path))
    assert again is not first and first.closed
    window = rasterio.windows.Window(0, 0, 4, 4)
    assert (again.read(1, window=window) == 7).all()


@pytest.mark.parametrize(
    ("collection", "bands", "dtype", "resampling"),
    [
        ("demo-sentinel-2-l2a", ["B02", "B11", "SCL"], "uint16", "nearest"),
        ("demo-sentinel-2-l2a", ["B04", "B12"], "float32", "bilinear"),
        ("demo-sentinel-1-rtc", ["vv", "vh"], "float32", "nearest"),
    ],
)
def test_chip_reads_match_odc_stac_load_on_scene_edges_and_in_another_utm_zone(
    demo_archive, collection, bands, dtype, resampling
):
    items = [i for i in demo_archive.items if i["collection"] == collection][:3]
    grid = GlobalGrid(cell_size=1280, pixel_size=10)
    cells = grid.cells_in_bbox((8.95, 45.37, 9.11, 45.48))
    chips = [ChipGrid(c.crs, c.x0, c.y0, c.size, c.pixel_size) for c in cells[:: max(1, len(cells) // 8)]]
    x, y = Transformer.from_crs(4326, 32631, always_xy=True).transform(9.03, 45.43)
    chips.append(ChipGrid("EPSG:32631", round(x / 10) * 10, round(y / 10) * 10, 64, 10.0))  # a warp
    chips.append(ChipGrid(chips[0].crs, chips[0].x0, chips[0].y0, 128, 10.0, height=64))  # a row of chips
    for chip in chips:
        ds = _load_dataset(items, bands, chip.geobox(), dtype, resampling=resampling)
        nodata = float("nan") if dtype == "float32" else 0
        # read_items gives each band's own nodata (odc-stac's ``nodata`` attribute) as the collection's
        want = np.stack([np.where(ds[b].values == ds[b].attrs.get("nodata"), nodata, ds[b].values) for b in bands], 1)
        got = read_items(items, bands, chip, dtype=np.dtype(dtype), nodata=nodata, resampling=resampling)
        np.testing.assert_array_equal(got, want, err_msg=f"{chip}")


def test_changed_items_are_parsed_again(demo_archive, tmp_path):
    item = next(i for i in demo_archive.items if i["collection"] == "demo-sentinel-2-l2a")
    cell = GlobalGrid(cell_size=1280, pixel_size=10).cells_in_bbox((9.03, 45.43, 9.04, 45.44))[0]
    chip = ChipGrid(cell.crs, cell.x0, cell.y0, cell.size, cell.pixel_size)
    before = read_items([item], ["B04"], chip, dtype=np.dtype("uint16"), nodata=0)
    assert (before > 0).any()
    path = tmp_path / "B04.tif"
    with rasterio.open(item["assets"]["B04"]["href"].removeprefix("file://")) as src:
        profile, data = src.profile, src.read(1)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.where(data > 0, 5, 0).astype(data.dtype), 1)
    moved = {**item, "assets": {**item["assets"], "B04": {**item["assets"]["B04"], "href": f"file://{path}"}}}
    after = read_items([moved], ["B04"], chip, dtype=np.dtype("uint16"), nodata=0)
    np.testing.assert_array_equal(after, np.where(before > 0, 5, 0))
