"""Shift estimation and correction on the demo archive: known shifts injected into S2 and S1 scenes.

The demo sensors sample one procedural landscape, so S1 sits exactly ``SENSOR_SHIFTS["sentinel-1"]``
(4 m east, 3 m south = 0.4, -0.3 px) from S2; the injected shift comes on top of it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window
from scipy import ndimage

from eoprep.align import SCL_CLASSES, MaskRule, apply_shift, estimate_shift
from eoprep.demo import S1_COLLECTION, S2_COLLECTION, SENSOR_SHIFTS

SHIFTS = [(0.0, 0.0), (2.0, -1.0), (-5.0, 3.0), (4.0, 5.0), (0.25, -0.5), (-1.7, 2.35), (3.6, -4.4), (-4.9, -0.1)]
SIZE, MARGIN = 128, 12
SCL_RULE = MaskRule("SCL", "classes", SCL_CLASSES, exclude=("cloud", "shadow"), cloud=("cloud",))


def _path(item: dict, band: str) -> str:
    return item["assets"][band]["href"].removeprefix("file://")


def _read(item: dict, band: str, col: int, row: int) -> np.ndarray:
    """A window with a margin; 20 m bands are read at 10 m by pixel replication."""
    with rasterio.open(_path(item, band)) as src:
        if src.res[0] == 10:
            return src.read(1, window=Window(col - MARGIN, row - MARGIN, SIZE + 2 * MARGIN, SIZE + 2 * MARGIN))
        half = src.read(
            1, window=Window((col - MARGIN) // 2, (row - MARGIN) // 2, SIZE // 2 + MARGIN, SIZE // 2 + MARGIN)
        )
        return np.kron(half, np.ones((2, 2), half.dtype))


def _inject(image: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """Displace the content by (dx, dy) px east/north (cubic spline), then cut the margin."""
    moved = ndimage.shift(image.astype(np.float64), (-dy, dx), order=3, mode="nearest")
    return moved[MARGIN:-MARGIN, MARGIN:-MARGIN]


def _crop(image: np.ndarray) -> np.ndarray:
    return image[MARGIN:-MARGIN, MARGIN:-MARGIN]


@pytest.fixture(scope="module")
def scenes(demo_archive):
    s2 = [i for i in demo_archive.items if i["collection"] == S2_COLLECTION]
    s1 = [i for i in demo_archive.items if i["collection"] == S1_COLLECTION]
    return s2, s1


def _rmse(errors: list[tuple[float, float]]) -> float:
    e = np.asarray(errors)
    return float(np.sqrt(np.mean(np.sum(e**2, axis=1))))


def test_optical_to_optical_across_dates_with_clouds(scenes):
    s2, _ = scenes
    reference, cloudy = s2[0], s2[1]  # the second date has ~35 % cloud and shadow in SCL
    errors = []
    for k, (dx, dy) in enumerate(SHIFTS):
        col, row = 60 + 20 * k, 90 + 10 * k
        ref = np.stack([_crop(_read(reference, b, col, row)) for b in ("B04", "B08")])
        mov = np.stack([_inject(_read(cloudy, b, col, row), dx, dy) for b in ("B04", "B08")])
        scl = np.round(_inject(_read(cloudy, "SCL", col, row), dx, dy)).astype(np.uint8)
        clear = ~ndimage.binary_dilation(SCL_RULE.unusable(scl), iterations=2)
        est = estimate_shift(ref, mov, moving_valid=clear)
        assert est.confidence > 0.05
        errors.append((est.dx - dx, est.dy - dy))
    rmse = _rmse(errors)
    assert rmse < 0.1, f"optical↔optical residual RMSE {rmse:.3f} px"


def test_sar_to_optical(scenes):
    s2, s1 = scenes
    true_dx, true_dy = (v / 10.0 for v in SENSOR_SHIFTS["sentinel-1"])
    errors = []
    for k, (dx, dy) in enumerate(SHIFTS):
        col, row = 40 + 25 * k, 200 - 12 * k
        ref = np.stack([_crop(_read(s2[4], b, col, row)) for b in ("B04", "B08")])
        mov = np.stack([_inject(_read(s1[k % len(s1)], b, col, row), dx, dy) for b in ("vv", "vh")])
        est = estimate_shift(ref, mov, modalities=("optical", "sar"))
        assert est.confidence > 0.05
        errors.append((est.dx - dx - true_dx, est.dy - dy - true_dy))
    rmse = _rmse(errors)
    assert rmse < 0.3, f"SAR↔optical residual RMSE {rmse:.3f} px"


def test_sar_on_speckle_alone_is_not_trusted():
    rng = np.random.default_rng(3)
    a = rng.gamma(4.0, 0.25, (SIZE, SIZE)).astype(np.float32)
    b = rng.gamma(4.0, 0.25, (SIZE, SIZE)).astype(np.float32)
    est = estimate_shift(a, b, modalities=("sar", "sar"))
    assert est.confidence < 0.05


def test_too_little_overlap_gives_no_estimate(scenes):
    s2, _ = scenes
    img = _crop(_read(s2[0], "B08", 100, 100))
    valid = np.zeros(img.shape, bool)
    valid[:20, :20] = True
    est = estimate_shift(img, img, moving_valid=valid)
    assert est.confidence == 0 and np.isnan(est.dx)


@pytest.mark.parametrize("method", ["spline", "bilinear", "fourier"])
def test_apply_shift_undoes_a_shift_and_keeps_nodata_out(scenes, method):
    s2, _ = scenes
    big = _read(s2[0], "B08", 100, 100).astype(np.float64)
    ref = _crop(big)
    mov = _inject(big, 1.5, -2.25)
    valid = np.ones(mov.shape, bool)
    valid[40:50, 60:70] = False
    back, ok = apply_shift(mov, 1.5, -2.25, valid=valid, method=method)
    assert not ok[39:47, 59:68].any() and ok.mean() > 0.9  # the hole moved 2.25 px up, 1.5 px left
    inner = ok.copy()
    inner[:8], inner[-8:], inner[:, :8], inner[:, -8:] = False, False, False, False
    rel = np.abs(back - ref)[inner] / ref[inner]
    assert np.median(rel) < 0.02
    est = estimate_shift(ref, np.where(ok, back, 0), moving_valid=ok)
    assert abs(est.dx) < 0.05 and abs(est.dy) < 0.05


def test_estimate_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one grid"):
        estimate_shift(np.zeros((8, 8)), np.zeros((8, 9)))
    with pytest.raises(ValueError, match="unknown co-registration method"):
        estimate_shift(np.zeros((8, 8)), np.zeros((8, 8)), method="sift")


def test_demo_files_exist(scenes):
    s2, s1 = scenes
    assert len(s2) == 8 and len(s1) == 7 and Path(_path(s1[0], "vv")).exists()
