"""The Earth Engine source against a real local HTTP server speaking the EE REST API (tests/ee_server.py)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xarray as xr

pytest.importorskip("ee")
pytest.importorskip("xee")

from conftest import TEST_BBOX, make_spec  # noqa: E402
from ee_server import FakeEarthEngine, FakeImage, fake_pixels  # noqa: E402
from eoprep.config import PipelineSpec, parse_spec  # noqa: E402
from eoprep.demo import DEMO_DATETIME, S2_COLLECTION, DemoArchive  # noqa: E402
from eoprep.errors import EoprepError  # noqa: E402
from eoprep.grid import GlobalGrid  # noqa: E402
from eoprep.pipeline import run_pipeline  # noqa: E402
from eoprep.sources import ChipGrid, aoi_geometry, earthengine_cube, read_items, search_earthengine  # noqa: E402
from eoprep.sources._earthengine import request_tiles  # noqa: E402

BANDS = ["B02", "B08", "SCL"]
PROJECT = "test-project"


def _quiet(_msg: str) -> None:
    pass


def _images(archive: DemoArchive) -> list[FakeImage]:
    """The demo Sentinel-2 scenes as EE images: same ids, dates, footprints and band types as the STAC items."""
    out = []
    for item in archive.items:
        if item["collection"] != S2_COLLECTION:
            continue
        types = {
            b: item["assets"][b]["raster:bands"][0]["data_type"]
            for b in item["assets"]
            if "raster:bands" in item["assets"][b]
        }
        cloud = item["properties"]["eo:cloud_cover"]
        out.append(
            FakeImage.asset(
                S2_COLLECTION, item["id"], item["properties"]["datetime"], item["geometry"], types, CLOUDY=cloud
            )
        )
    return out


@pytest.fixture
def fake_ee(demo_archive: DemoArchive) -> Iterator[FakeEarthEngine]:
    fake = FakeEarthEngine({S2_COLLECTION: _images(demo_archive)})
    with fake.running():
        yield fake


def ee_spec(out: Path, url: str, *, collection: dict[str, Any] | None = None, **source: Any) -> PipelineSpec:
    data: dict[str, Any] = {
        "name": "ee-test",
        "source": {
            "kind": "earthengine",
            "url": url,
            "project": PROJECT,
            "credentials": "none",
            "collections": [collection or {"id": S2_COLLECTION, "name": "s2", "bands": BANDS}],
            "aoi": {"bbox": TEST_BBOX},
            "datetime": DEMO_DATETIME,
            "request_retries": 2,
            "backoff": 0.01,
            **source,
        },
        "grid": {"cell_size": 1280, "pixel_size": 10},
        "time": {"mode": "scenes", "max_scenes": 8},
        "loader": {"retries": 0, "backoff": 0.01},
        "output": {"path": str(out), "chips_per_shard": 4},
    }
    return parse_spec(json.loads(json.dumps(data)))


def _centres(grid: ChipGrid) -> tuple[np.ndarray, np.ndarray]:
    offsets = (np.arange(grid.size) + 0.5) * grid.pixel_size
    return np.meshgrid(grid.x0 + offsets, grid.y0 - offsets)


def _first_grid(spec: PipelineSpec) -> ChipGrid:
    grid = GlobalGrid(cell_size=spec.grid.cell_size, pixel_size=spec.grid.pixel_size)
    cell = grid.cells_in_geometry(aoi_geometry(spec.source.aoi))[0]
    return ChipGrid(cell.crs, cell.x0, cell.y0, cell.size, cell.pixel_size)


def _read(spec: PipelineSpec, grid: ChipGrid, n: int = 1) -> tuple[list[dict[str, Any]], np.ndarray]:
    items = [it.to_dict() for it in search_earthengine(spec.source)["s2"][:n]]
    data = read_items(items, BANDS, grid, dtype=np.dtype("uint16"), nodata=0, engine="odc-stac")
    return items, data


def test_search_turns_ee_images_into_stac_items(fake_ee: FakeEarthEngine, tmp_path: Path) -> None:
    spec = ee_spec(
        tmp_path,
        fake_ee.url,
        collection={"id": S2_COLLECTION, "name": "s2", "bands": BANDS, "filters": {"CLOUDY": {"lt": 101}}},
    )
    items = search_earthengine(spec.source)["s2"]
    assert len(items) == 8 and [it.datetime for it in items] == sorted(it.datetime for it in items)
    first = items[0]
    assert first.id == f"{S2_COLLECTION}/{first.properties['ee:index']}"
    assert first.assets["B02"].href == f"ee://{S2_COLLECTION}/{first.properties['ee:index']}#B02"
    assert first.assets["SCL"].extra_fields["raster:bands"] == [{"data_type": "uint8", "nodata": 0}]
    query = json.dumps(fake_ee.requests[-1]["body"]["expression"])
    for part in (
        "ImageCollection.load",
        S2_COLLECTION,
        "Filter.dateRangeContains",
        "Filter.intersects",
        "Filter.lessThan",
        "CLOUDY",
    ):
        assert part in query


def test_reader_requests_exactly_the_chip_grid_and_gets_the_server_pixels(
    fake_ee: FakeEarthEngine, tmp_path: Path
) -> None:
    spec = ee_spec(tmp_path, fake_ee.url)
    grid = _first_grid(spec)
    items, data = _read(spec, grid)
    (body,) = fake_ee.pixel_requests()
    assert body["grid"]["crsCode"] == grid.crs
    assert body["grid"]["dimensions"] == {"width": grid.size, "height": grid.size}
    t = body["grid"]["affineTransform"]
    assert (t["scaleX"], t["scaleY"], t["translateX"], t["translateY"]) == (10, -10, grid.x0, grid.y0)
    assert body["fileFormat"] == "NPY"
    expression = json.dumps(body["expression"])
    assert items[0]["properties"]["ee:index"] in expression and "Image.select" in expression
    x, y = _centres(grid)
    for k, band in enumerate(BANDS):
        expected = fake_pixels(items[0]["id"], band, x, y, "uint8" if band == "SCL" else "uint16")
        np.testing.assert_array_equal(data[0, k], expected)


def test_server_side_mask_and_tiled_requests(fake_ee: FakeEarthEngine, tmp_path: Path) -> None:
    mask = {"band": "SCL", "classes": [3, 8, 9, 10, 40, 41, 42]}
    coll = {"id": S2_COLLECTION, "name": "s2", "bands": BANDS, "mask": mask}
    spec = ee_spec(tmp_path, fake_ee.url, collection=coll, request_bytes=64 * 64 * 15)
    grid = _first_grid(spec)
    items, data = _read(spec, grid)
    bodies = fake_ee.pixel_requests()
    assert len(bodies) == len(request_tiles(grid.size, 15, 64 * 64 * 15)) == 4
    assert all(b["grid"]["dimensions"] == {"width": 64, "height": 64} for b in bodies)
    assert "Image.updateMask" in json.dumps(bodies[0]["expression"])
    x, y = _centres(grid)
    scl = fake_pixels(items[0]["id"], "SCL", x, y, "uint8")
    masked = np.isin(scl, mask["classes"])
    assert masked.any() and not masked.all()
    expected = np.where(masked, 0, fake_pixels(items[0]["id"], "B08", x, y, "uint16"))
    np.testing.assert_array_equal(data[0, 1], expected)


def test_retries_429_and_503_then_succeeds(fake_ee: FakeEarthEngine, tmp_path: Path) -> None:
    spec = ee_spec(tmp_path, fake_ee.url, request_retries=3)
    grid = _first_grid(spec)
    _, clean = _read(spec, grid)
    fake_ee.requests.clear()
    fake_ee.fail(429, times=2)
    fake_ee.fail(503, times=1)
    _, data = _read(spec, grid)
    assert len(fake_ee.pixel_requests()) == 4
    np.testing.assert_array_equal(data, clean)


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (429, r"quota exceeded for project test-project .* after 2 retries"),
        (503, r"kept failing .* after 2 retries \(HTTP 503"),
    ],
)
def test_requests_that_keep_failing_give_one_line(
    fake_ee: FakeEarthEngine, tmp_path: Path, status: int, message: str
) -> None:
    spec = ee_spec(tmp_path, fake_ee.url)
    fake_ee.fail(status)
    with pytest.raises(EoprepError, match=message) as info:
        _read(spec, _first_grid(spec))
    assert "\n" not in str(info.value) and len(fake_ee.pixel_requests()) == 3


def test_request_too_large_for_the_server(demo_archive: DemoArchive, tmp_path: Path) -> None:
    fake = FakeEarthEngine({S2_COLLECTION: _images(demo_archive)}, request_byte_limit=10_000)
    with fake.running():
        spec = ee_spec(tmp_path, fake.url)
        with pytest.raises(EoprepError, match=r"too large \(Total request size .*lower source.request_bytes") as info:
            _read(spec, _first_grid(spec))
    assert "\n" not in str(info.value) and len(fake.pixel_requests()) == 1


def test_unknown_collection_and_band(fake_ee: FakeEarthEngine, tmp_path: Path) -> None:
    spec = ee_spec(tmp_path, fake_ee.url, collection={"id": "NOPE/S2", "name": "s2", "bands": BANDS})
    with pytest.raises(EoprepError, match=r"Earth Engine rejected the search of NOPE/S2: .*'NOPE/S2' not found"):
        search_earthengine(spec.source)
    spec = ee_spec(tmp_path, fake_ee.url, collection={"id": S2_COLLECTION, "name": "s2", "bands": ["B02", "B99"]})
    with pytest.raises(EoprepError, match=r"source.collections\[0\].bands: \['B99'\] not among the bands .*B02, B03"):
        search_earthengine(spec.source)


def test_no_credentials(fake_ee: FakeEarthEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "EE_PROJECT", "GOOGLE_CLOUD_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    monkeypatch.setenv("NO_GCE_CHECK", "True")
    spec = ee_spec(tmp_path, fake_ee.url, credentials="default")
    with pytest.raises(
        EoprepError, match=r"^source.credentials: no Earth Engine credentials found; .*earthengine authenticate`$"
    ):
        search_earthengine(spec.source)
    spec = ee_spec(tmp_path, fake_ee.url, credentials=str(tmp_path / "missing.json"))
    with pytest.raises(EoprepError, match=r"service-account key file .*missing.json does not exist"):
        search_earthengine(spec.source)
    spec = ee_spec(tmp_path, fake_ee.url, project=None)
    with pytest.raises(EoprepError, match=r"^source.project: no Google Cloud project"):
        search_earthengine(spec.source)


def test_service_account_key_file_authenticates_and_stays_out_of_outputs(
    fake_ee: FakeEarthEngine, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        .decode()
    )
    key = {
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": "k1",
        "private_key": pem,
        "client_email": f"runner@{PROJECT}.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": f"{fake_ee.url}/token",
    }
    key_file = tmp_path / "key.json"
    key_file.write_text(json.dumps(key))
    spec = ee_spec(tmp_path, fake_ee.url, credentials=str(key_file), project=None)
    items = search_earthengine(spec.source)["s2"]
    assert fake_ee.requests[-1]["auth"] == "Bearer fake-access-token"
    secret = pem.splitlines()[1]
    assert secret not in json.dumps([it.to_dict() for it in items]) and secret not in json.dumps(fake_ee.requests)


def _fail_chip(grid: ChipGrid) -> Any:
    def match(body: dict[str, Any]) -> bool:
        t = body["grid"]["affineTransform"]
        return (t["translateX"], t["translateY"]) == (grid.x0, grid.y0)

    return match


@pytest.mark.slow
def test_pipeline_on_a_cluster_writes_the_server_pixels_and_skips_a_failing_chip(
    fake_ee: FakeEarthEngine, client: Any, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    spec = ee_spec(out, fake_ee.url, max_concurrency=2)
    broken = _first_grid(spec)
    fake_ee.fail(503, when=_fail_chip(broken))
    summary = run_pipeline(spec, client=client, say=_quiet)
    assert summary.chips_planned > 1 and summary.chips_written == summary.chips_planned - 1
    ((chip, reason),) = summary.skipped
    assert "EoprepError: Earth Engine kept failing" in reason and "HTTP 503" in reason
    ds = xr.open_zarr(out / "chips.zarr", group="s2")
    assert list(ds["band"].values) == BANDS and ds["pixels"].dtype == np.uint16
    bad = ds.sel(chip=chip)
    assert not bool(bad["written"]) and not bad["pixels"].values.any()
    assert {b["grid"]["crsCode"] for b in fake_ee.pixel_requests()} == {broken.crs}
    good = ds.isel(chip=[i for i, c in enumerate(ds["chip"].values) if c != chip][0])
    x0, _, _, y0, _, _ = good["transform"].values
    x, y = _centres(ChipGrid(str(good["crs"].values), x0, y0, 128, 10.0))
    ids = json.loads(str(good["item_ids"].values))
    assert len(ids) == 8
    for t, item_id in enumerate(ids):
        for k, band in enumerate(BANDS):
            dtype = "uint8" if band == "SCL" else "uint16"
            np.testing.assert_array_equal(good["pixels"].values[t, k], fake_pixels(item_id, band, x, y, dtype))


@pytest.mark.slow
def test_failing_chip_under_on_error_fail_writes_nothing(fake_ee: FakeEarthEngine, client: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    data = ee_spec(out, fake_ee.url).model_dump(mode="json")
    data["loader"]["on_error"] = "fail"
    spec = parse_spec(data)
    fake_ee.fail(429)
    with pytest.raises(EoprepError, match=r"reads failed .*quota exceeded for project test-project") as info:
        run_pipeline(spec, client=client, say=_quiet)
    assert "\n" not in str(info.value)
    if (out / "chips.zarr").exists():
        ds = xr.open_zarr(out / "chips.zarr", group="s2", consolidated=False)
        assert not bool(ds["written"].any()) and not ds["pixels"].values.any()


@pytest.mark.slow
def test_parity_with_the_stac_source(fake_ee: FakeEarthEngine, stac_api: str, client: Any, tmp_path: Path) -> None:
    stac_out, ee_out = tmp_path / "stac", tmp_path / "ee"
    stac = make_spec(stac_out)
    stac = parse_spec(
        {
            **stac.model_dump(mode="json"),
            "source": {
                **stac.source.model_dump(mode="json"),
                "collections": [{"id": S2_COLLECTION, "name": "s2", "bands": BANDS}],
            },
        }
    )
    run_pipeline(stac, client=client, catalog_url=stac_api, say=_quiet)
    run_pipeline(ee_spec(ee_out, fake_ee.url), client=client, say=_quiet)
    a = xr.open_zarr(stac_out / "chips.zarr", group="s2")
    b = xr.open_zarr(ee_out / "chips.zarr", group="s2")
    assert a["pixels"].dims == b["pixels"].dims and a["pixels"].shape == b["pixels"].shape
    assert a["pixels"].dtype == b["pixels"].dtype
    for name in ("chip", "band", "crs", "cell", "footprint"):
        assert list(a[name].values) == list(b[name].values), name
    for name in ("transform", "easting", "northing", "datetime"):
        np.testing.assert_array_equal(a[name].values, b[name].values)
    assert [len(json.loads(s)) for s in a["item_ids"].values] == [len(json.loads(s)) for s in b["item_ids"].values]
    assert bool(a["written"].all()) and bool(b["written"].all())


def test_xee_cube_is_chunked_within_the_request_cap(fake_ee: FakeEarthEngine, tmp_path: Path) -> None:
    cap = 64 * 64 * 5 * 8
    spec = ee_spec(tmp_path, fake_ee.url, request_bytes=cap)
    grid = _first_grid(spec)
    transform = (grid.pixel_size, 0.0, grid.x0, 0.0, -grid.pixel_size, grid.y0)
    ds = earthengine_cube(spec.source, crs=grid.crs, transform=transform, shape=(grid.size, grid.size))
    assert set(ds.data_vars) == set(BANDS) and ds["B08"].shape == (8, 128, 128)
    assert ds["B08"].chunks is not None
    fake_ee.requests.clear()
    values = ds["B08"].isel(time=slice(0, 2)).compute(scheduler="threads").values
    bodies = fake_ee.pixel_requests()
    assert bodies and all(
        b["grid"]["dimensions"]["width"] * b["grid"]["dimensions"]["height"] * 2 * 5 <= cap for b in bodies
    )
    np.testing.assert_array_equal(ds["x"].values[:2], grid.x0 + np.array([5.0, 15.0]))
    x, y = _centres(grid)
    items = search_earthengine(spec.source)["s2"]
    np.testing.assert_array_equal(values[1], fake_pixels(items[1].id, "B08", x, y, "uint16").astype("float32"))
    assert pd.Timestamp(ds["time"].values[1]) == pd.Timestamp(items[1].datetime).tz_convert(None)


def test_example_pipelines_validate() -> None:
    from eoprep.config import load_spec

    root = Path(__file__).parents[2] / "pipelines"
    for name in ("earthengine-sentinel-2.yaml", "earthengine-satellite-embedding.yaml"):
        spec = load_spec(root / name)
        assert spec.source.kind == "earthengine"


@pytest.mark.skipif(
    not os.environ.get("EOPREP_EE_LIVE"), reason="set EOPREP_EE_LIVE=1 (and Earth Engine credentials + EE_PROJECT)"
)
def test_live_earth_engine_tiny_query(tmp_path: Path) -> None:
    data = ee_spec(tmp_path, "https://earthengine.googleapis.com").model_dump(mode="json")
    data["source"].update(
        credentials="default",
        project=os.environ.get("EE_PROJECT"),
        datetime="2024-06-01/2024-06-10",
        collections=[{"id": "COPERNICUS/S2_SR_HARMONIZED", "name": "s2", "bands": ["B2", "B8"]}],
    )
    spec = parse_spec(data)
    items = search_earthengine(spec.source)["s2"][:1]
    grid = _first_grid(spec)
    chip = read_items([items[0].to_dict()], ["B2", "B8"], grid, dtype=np.dtype("uint16"), nodata=0)
    assert chip.shape == (1, 2, grid.size, grid.size) and chip.any()
