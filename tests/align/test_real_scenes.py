"""Known shifts injected into real Sentinel-2, Landsat 8 and Sentinel-1 scenes (tests/data/align).

A shift is injected the way it happens in an archive: the moving band is warped onto a chip grid
whose origin is offset by the shift, so its content lands displaced by a known amount. Sentinel-1
GRD has only GCPs: it is warped from them onto a UTM chip grid first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pyproj import Transformer
from rasterio.transform import from_gcps

from eoprep.align import QA_PIXEL_BITS, SCL_CLASSES, MaskRule, estimate_shift, warp_to_grid
from eoprep.sources import ChipGrid

DATA = Path(__file__).parents[1] / "data" / "align"
#: Integer and sub-pixel shifts (pixels east, north) up to ±5 px.
SHIFTS = [(0.0, 0.0), (1.0, -2.0), (-3.0, 4.0), (5.0, -5.0), (0.3, -0.7), (-2.5, 1.25), (4.6, 3.3), (-4.2, -0.4)]


def _shifted(grid: ChipGrid, dx: float, dy: float) -> ChipGrid:
    """The grid on which a band's content appears displaced by (dx, dy) pixels east/north."""
    return ChipGrid(
        grid.crs, grid.x0 - dx * grid.pixel_size, grid.y0 - dy * grid.pixel_size, grid.size, grid.pixel_size
    )


def _rmse(errors: list[tuple[float, float]]) -> float:
    e = np.asarray(errors)
    return float(np.sqrt(np.mean(np.sum(e**2, axis=1))))


def _residuals(ref_path, mov_path, grid, *, ref_valid=None, modalities=("optical", "optical"), resampling="cubic"):
    ref, ref_ok = warp_to_grid(ref_path, grid, resampling=resampling)
    ok = ref_ok[0] if ref_valid is None else ref_ok[0] & ref_valid
    errors, confidences = [], []
    for dx, dy in SHIFTS:
        mov, mov_ok = warp_to_grid(mov_path, _shifted(grid, dx, dy), resampling=resampling)
        est = estimate_shift(ref[0], mov[0], reference_valid=ok, moving_valid=mov_ok[0], modalities=modalities)
        errors.append((est.dx - dx, est.dy - dy))
        confidences.append(est.confidence)
    return _rmse(errors), min(confidences)


def test_sentinel2_b04_b08_with_clouds_masked():
    grid = ChipGrid("EPSG:32629", 283180.0 + 2000, 2780820.0 - 2000, 200, 100.0)
    scl, scl_ok = warp_to_grid(DATA / "s2_SCL.tif", grid, resampling="nearest")
    rule = MaskRule("SCL", "classes", SCL_CLASSES, exclude=("cloud", "shadow"), cloud=("cloud",))
    clear = scl_ok[0] & ~rule.unusable(scl[0])
    assert 0.05 < 1 - clear.mean() < 0.5
    rmse, confidence = _residuals(DATA / "s2_B04.tif", DATA / "s2_B08.tif", grid, ref_valid=clear)
    assert rmse < 0.1, f"S2 B04↔B08 residual RMSE {rmse:.3f} px"
    assert confidence > 0.05


def test_landsat_red_nir_with_fill_and_qa_masked():
    grid = ChipGrid("EPSG:32624", 398651.4 + 20 * 515.0, 8110735.96 - 20 * 515.0, 192, 515.0)
    qa, qa_ok = warp_to_grid(DATA / "landsat_QA_PIXEL.tif", grid, resampling="nearest", nodata=1)
    rule = MaskRule("QA_PIXEL", "bits", QA_PIXEL_BITS, exclude=("nodata", "cloud", "shadow"), cloud=("cloud",))
    clear = qa_ok[0] & ~rule.unusable(qa[0])
    b4, b4_ok = warp_to_grid(DATA / "landsat_SR_B4.tif", grid)
    assert 0.02 < 1 - b4_ok[0].mean() < 0.5
    rmse, confidence = _residuals(DATA / "landsat_SR_B4.tif", DATA / "landsat_SR_B5.tif", grid, ref_valid=clear)
    assert rmse < 0.1, f"Landsat SR_B4↔SR_B5 residual RMSE {rmse:.3f} px"
    assert confidence > 0.05


def _s1_grid(size: int = 192, pixel: float = 200.0) -> ChipGrid:
    """A UTM 43N chip grid centred on the Sentinel-1 crop, located through its GCPs."""
    import rasterio

    with rasterio.open(DATA / "s1_vv.tif") as src:
        lon, lat = from_gcps(src.gcps[0]) * (src.width / 2, src.height / 2)
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:32643", always_xy=True).transform(lon, lat)
    half = size * pixel / 2
    return ChipGrid("EPSG:32643", round(x - half, -2), round(y + half, -2), size, pixel)


def test_sentinel1_is_warped_from_its_gcps_onto_a_utm_chip():
    grid = _s1_grid()
    data, valid = warp_to_grid(DATA / "s1_vv.tif", grid)
    assert valid.mean() > 0.95
    assert np.isfinite(data[valid]).all() and np.median(data[valid]) > 0
    # The grid is not where the GCPs are: nothing to warp.
    far = ChipGrid("EPSG:32643", grid.x0 + 5e5, grid.y0, grid.size, grid.pixel_size)
    assert not warp_to_grid(DATA / "s1_vv.tif", far)[1].any()


def test_sentinel1_vv_vh_after_gcp_warp():
    rmse, confidence = _residuals(
        DATA / "s1_vv.tif", DATA / "s1_vh.tif", _s1_grid(), modalities=("sar", "sar"), resampling="bilinear"
    )
    assert rmse < 0.3, f"S1 VV↔VH residual RMSE {rmse:.3f} px"
    assert confidence > 0.05


def test_unrelated_scenes_get_low_confidence():
    s2_grid = ChipGrid("EPSG:32629", 283180.0 + 2000, 2780820.0 - 2000, 128, 100.0)
    other = ChipGrid("EPSG:32629", s2_grid.x0 + 9000, s2_grid.y0 - 9000, 128, 100.0)
    a, a_ok = warp_to_grid(DATA / "s2_B04.tif", s2_grid)
    b, b_ok = warp_to_grid(DATA / "s2_B08.tif", other)
    est = estimate_shift(a[0], b[0], reference_valid=a_ok[0], moving_valid=b_ok[0])
    assert est.confidence < 0.05


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_warp_refuses_rasters_without_georeference(tmp_path):
    import rasterio

    bare = tmp_path / "bare.tif"
    with rasterio.open(bare, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint16") as dst:
        dst.write(np.ones((8, 8), np.uint16), 1)
    with pytest.raises(ValueError, match="neither a CRS nor GCPs"):
        warp_to_grid(bare, ChipGrid("EPSG:32629", 0.0, 0.0, 8, 10.0))
