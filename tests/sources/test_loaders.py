"""The three loader engines read the same pixels onto a chip grid, including chips that leave the scene."""

from __future__ import annotations

import numpy as np
import pytest
from pyproj import Transformer

from eoprep.grid import GlobalGrid
from eoprep.sources import ChipGrid, read_items

CASES = [
    ("demo-sentinel-2-l2a", ["B02", "B08", "B11", "SCL"], "uint16", 0.0),
    ("demo-sentinel-1-rtc", ["vv", "vh"], "float32", float("nan")),
    ("demo-landsat-c2-l2", ["red", "qa_pixel"], "uint16", 0.0),
]


def _items(archive, collection):
    return [i for i in archive.items if i["collection"] == collection][:3]


@pytest.mark.parametrize(("collection", "bands", "dtype", "nodata"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("engine", ["stackstac", "rasterio"])
def test_engines_match_odc_stac_on_the_chip_grid(demo_archive, collection, bands, dtype, nodata, engine):
    grid = GlobalGrid(cell_size=1280, pixel_size=10)
    items = _items(demo_archive, collection)
    cells = grid.cells_in_bbox((8.95, 45.37, 9.11, 45.48))
    edge_seen = False
    for cell in cells[:: max(1, len(cells) // 12)]:
        chip = ChipGrid(cell.crs, cell.x0, cell.y0, cell.size, cell.pixel_size)
        ref = read_items(items, bands, chip, dtype=np.dtype(dtype), nodata=nodata)
        got = read_items(items, bands, chip, dtype=np.dtype(dtype), nodata=nodata, engine=engine)
        np.testing.assert_array_equal(got, ref, err_msg=f"{engine} {cell.id}")
        empty = np.isnan(ref) if np.isnan(nodata) else ref == nodata
        edge_seen |= bool(empty.any() and not empty.all())
    assert edge_seen, "no chip crossed a scene edge; the case that needs care was not exercised"


def test_rasterio_engine_warps_into_another_utm_zone_like_odc_stac(demo_archive):
    x, y = Transformer.from_crs(4326, 32631, always_xy=True).transform(9.03, 45.43)
    chip = ChipGrid("EPSG:32631", round(x / 10) * 10, round(y / 10) * 10, 96, 10.0)
    items = _items(demo_archive, "demo-sentinel-2-l2a")
    ref = read_items(items, ["B04", "B11"], chip, dtype=np.dtype("uint16"), nodata=0)
    got = read_items(items, ["B04", "B11"], chip, dtype=np.dtype("uint16"), nodata=0, engine="rasterio")
    np.testing.assert_array_equal(got, ref)
    assert (ref > 0).all()


def test_unknown_engine_is_named(demo_archive):
    chip = ChipGrid("EPSG:32632", 500000.0, 5030000.0, 8, 10.0)
    with pytest.raises(ValueError, match="loader.engine: unknown engine 'gdal'"):
        read_items(
            _items(demo_archive, "demo-sentinel-2-l2a"),
            ["B02"],
            chip,
            dtype=np.dtype("uint16"),
            nodata=0,
            engine="gdal",
        )


@pytest.mark.parametrize(
    ("collection", "bands"),
    [("demo-sentinel-2-l2a", ["B02", "B11", "SCL"]), ("demo-landsat-c2-l2", ["red", "qa_pixel"])],
    ids=["s2-20m", "landsat-30m"],
)
def test_odc_stac_reads_nested_bands_on_their_own_grid_with_the_pixels_of_its_warp(demo_archive, collection, bands):
    import odc.stac
    import pystac

    from eoprep.sources._loaders import _nested_bands

    grid = GlobalGrid(cell_size=1280, pixel_size=10)
    items = _items(demo_archive, collection)
    cells = grid.cells_in_bbox((8.95, 45.37, 9.11, 45.48))
    offsets = set()
    for cell in cells[:: max(1, len(cells) // 10)]:
        chip = ChipGrid(cell.crs, cell.x0, cell.y0, cell.size, cell.pixel_size)
        nested = _nested_bands(items, bands, chip, "nearest")
        assert set(nested) == set(bands) - {"B02"}, "the coarse bands did not take the source-grid path"
        offsets |= {nest[1:] for nest in nested.values()}
        got = read_items(items, bands, chip, dtype=np.dtype("uint16"), nodata=0)
        ds = odc.stac.load(
            [pystac.Item.from_dict(i) for i in items],
            bands=bands,
            geobox=chip.geobox(),
            chunks=None,
            groupby="id",
            resampling="nearest",
            dtype="uint16",
            preserve_original_order=True,
        )
        # read_items maps each band's own nodata (QA_PIXEL's fill is 1) to the collection's 0
        want = [np.where(ds[b].values == ds[b].attrs.get("nodata", 0), 0, ds[b].values) for b in bands]
        np.testing.assert_array_equal(got, np.stack(want, axis=1), err_msg=cell.id)
    assert offsets - {(0, 0)}, "no chip started inside a source pixel; the offset case was not exercised"
