"""End to end: S2 + S1 + Landsat through run_pipeline; the stored shifts must recover the demo's known ones."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from conftest import make_spec
from eoprep.config import load_spec
from eoprep.demo import LANDSAT_COLLECTION, S1_COLLECTION, S2_COLLECTION, SENSOR_SHIFTS
from eoprep.pipeline import run_pipeline

pytestmark = pytest.mark.slow

_COLLECTIONS = [
    {"id": S2_COLLECTION, "name": "s2", "bands": ["B02", "B03", "B04", "B08", "B11", "B12", "SCL"]},
    {"id": S1_COLLECTION, "name": "s1", "bands": ["vv", "vh"], "match_tolerance": "6D"},
    {
        "id": LANDSAT_COLLECTION,
        "name": "landsat",
        "bands": ["red", "nir08", "swir16", "qa_pixel"],
        "match_tolerance": "8D",
    },
]
_ALIGN = {"reference": "s2", "bands": {"s2": ["B04", "B08"], "landsat": ["red", "nir08"]}}


def _quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def multisensor_run(stac_api, client, tmp_path_factory):
    out = tmp_path_factory.mktemp("align") / "out"
    spec = make_spec(out, source__collections=_COLLECTIONS, loader__resampling="bilinear", align=_ALIGN)
    summary = run_pipeline(spec, client=client, catalog_url=stac_api, say=_quiet)
    return spec, summary, out


def _shifts(out, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ds = xr.open_zarr(out / "chips.zarr", group=key)
    ds = ds.isel(chip=np.flatnonzero(ds["written"].values))
    return ds["shift_x"].values, ds["shift_y"].values, ds["shift_applied"].values


# Limits in each sensor's own pixels: S1 is 10 m (SAR↔optical 0.3 px), Landsat 30 m (optical↔optical 0.1 px).
@pytest.mark.parametrize(
    ("key", "sensor", "limit_m"), [("s1", "sentinel-1", 0.3 * 10), ("landsat", "landsat", 0.1 * 30)]
)
def test_stored_shifts_recover_the_known_sensor_shifts(multisensor_run, key, sensor, limit_m):
    _, summary, out = multisensor_run
    assert summary.chips_written == summary.chips_planned > 1
    sx, sy, applied = _shifts(out, key)
    assert applied.sum() >= 0.6 * np.isfinite(sx).sum() > 0
    true_x, true_y = SENSOR_SHIFTS[sensor]
    rmse_m = np.sqrt(np.mean((sx[applied] - true_x) ** 2 + (sy[applied] - true_y) ** 2))
    assert rmse_m < limit_m, f"{key}: residual RMSE {rmse_m:.2f} m"


def test_reference_dates_register_to_zero_and_scenes_line_up(multisensor_run):
    _, _, out = multisensor_run
    sx, sy, applied = _shifts(out, "s2")
    done = np.isfinite(sx)
    assert np.sum(np.isclose(sx[done], 0) & np.isclose(sy[done], 0) & ~applied[done]) >= 1
    assert np.sqrt(np.mean(sx[done] ** 2 + sy[done] ** 2)) / 10.0 < 0.1
    s1 = xr.open_zarr(out / "chips.zarr", group="s1")
    s2 = xr.open_zarr(out / "chips.zarr", group="s2")
    matched = s1["datetime"].notnull()
    gap = np.abs(s1["datetime"].where(matched) - s2["datetime"].where(matched)).max()
    assert gap <= np.timedelta64(6, "D") and bool(matched.any())
    assert s1.sizes["time"] == s2.sizes["time"]


def test_resampling_is_chosen_per_variable_and_recorded(multisensor_run):
    import json

    _, _, out = multisensor_run
    landsat = json.loads(xr.open_zarr(out / "chips.zarr", group="landsat")["pixels"].attrs["resampling"])
    assert landsat == {"red": "bilinear", "nir08": "bilinear", "swir16": "bilinear", "qa_pixel": "nearest"}
    s2 = json.loads(xr.open_zarr(out / "chips.zarr", group="s2")["pixels"].attrs["resampling"])
    assert s2["SCL"] == "nearest" and s2["B04"] == "bilinear"


def test_quality_thresholds_skip_chips_with_reasons(stac_api, client, tmp_path):
    spec = make_spec(tmp_path / "out", quality={"max_cloud": 0.01})
    summary = run_pipeline(spec, client=client, catalog_url=stac_api, say=_quiet)
    assert summary.chips_written < summary.chips_planned
    reasons = [reason for _, reason in summary.skipped]
    assert reasons and all(r.startswith("quality: s2 cloud_fraction") for r in reasons)
    ds = xr.open_zarr(tmp_path / "out" / "chips.zarr", group="s2")
    dropped = ~ds["written"].values
    assert (ds["cloud_fraction"].values[dropped] > 0.01).all()


def test_demo_multisensor_pipeline_file_validates():
    spec = load_spec("pipelines/demo-multisensor.yaml")
    assert spec.align is not None and spec.align.reference == "s2"
    assert [c.match_tolerance for c in spec.source.collections] == [None, "6D", "8D"]
