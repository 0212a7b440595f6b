"""End to end on the real parts: pgstac STAC API → LocalCluster (processes) → Zarr v3 shards + index + STAC."""

from __future__ import annotations

import json
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
import xarray as xr
import zarr
from rasterio.windows import from_bounds

from conftest import BROKEN_COLLECTION, TEST_BBOX, make_spec
from eoprep.demo import SENSOR_SHIFTS
from eoprep.errors import EoprepError
from eoprep.pipeline import run_pipeline

pytestmark = pytest.mark.slow


def _quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def demo_run(stac_api, client, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    spec = make_spec(out)
    summary = run_pipeline(spec, client=client, catalog_url=stac_api, say=_quiet)
    return spec, summary, out


def test_run_writes_every_chip_into_sharded_zarr(demo_run):
    spec, summary, out = demo_run
    assert summary.chips_written == summary.chips_planned > 1
    assert not summary.skipped
    ds = xr.open_zarr(out / "chips.zarr", group="s2")
    assert ds["pixels"].dims == ("chip", "time", "band", "y", "x")
    assert ds.sizes["y"] == ds.sizes["x"] == 128 and ds.sizes["time"] == 8
    assert list(ds["band"].values) == ["B02", "B03", "B04", "B08", "B11", "B12", "SCL"]
    assert ds["pixels"].dtype == np.uint16
    assert bool(ds["written"].all())
    arr = zarr.open_array(out / "chips.zarr", path="s2/pixels")
    assert arr.chunks == (1, 8, 7, 128, 128) and arr.shards == (4, 8, 7, 128, 128)
    assert (ds["datetime"].notnull().sum("time") == 8).all()
    assert set(ds["crs"].values) == {"EPSG:32632"}
    s1 = xr.open_zarr(out / "chips.zarr", group="s1")
    assert s1["pixels"].dtype == np.float32 and list(s1["chip"].values) == list(ds["chip"].values)


def test_chip_pixels_equal_the_source_cog_window(demo_run, demo_archive):
    _, _, out = demo_run
    ds = xr.open_zarr(out / "chips.zarr", group="s2").isel(chip=0)
    first = next(i for i in demo_archive.items if i["collection"] == "demo-sentinel-2-l2a")
    x0, _, _, y0, _, _ = ds["transform"].values
    bounds = (x0, y0 - 1280, x0 + 1280, y0)
    with rasterio.open(first["assets"]["B08"]["href"].removeprefix("file://")) as src:
        expected = src.read(1, window=from_bounds(*bounds, transform=src.transform))
    got = ds["pixels"].sel(band="B08").isel(time=0).values
    np.testing.assert_array_equal(got, expected)
    assert float(ds["easting"][0]) == x0 + 5.0 and float(ds["northing"][0]) == y0 - 5.0


def test_index_and_stac_describe_the_written_chips(demo_run):
    spec, summary, out = demo_run
    index = gpd.read_parquet(out / "index.parquet")
    assert set(index["collection"]) == {"s1", "s2"}
    s2 = index[index["collection"] == "s2"]
    assert len(s2) == summary.chips_written and s2["id"].is_unique
    assert s2.crs.to_epsg() == 4326
    assert s2.geometry.intersects(gpd.GeoSeries.from_xy([9.03], [45.417], crs=4326)[0]).any()
    assert ((s2["valid_fraction"] > 0.5) & (s2["valid_fraction"] <= 1)).all()
    assert ((s2["cloud_fraction"] > 0) & (s2["cloud_fraction"] < 1)).all()
    collection = json.loads((out / "stac" / "collection.json").read_text())
    items = sorted((out / "stac" / "items").glob("*.json"))
    assert len(items) == summary.chips_written and len(collection["links"]) == len(items)
    item = json.loads(items[0].read_text())
    assert item["properties"]["proj:code"] == "EPSG:32632" and set(item["assets"]) == {"s1", "s2"}
    footprint = s2.set_index("id").geometry[item["id"]]
    assert shapely.geometry.shape(item["geometry"]).equals_exact(footprint, 1e-9)
    assert item["bbox"] == list(footprint.bounds)
    product = json.loads((Path(__file__).parents[1] / "catalog" / "products" / "eoprep-chips.json").read_text())
    assert product["summaries"]["eoprep:index_columns"] == list(index.columns)
    coords = set(xr.open_zarr(out / "chips.zarr", group="s2").coords)
    assert set(product["summaries"]["eoprep:chip_coordinates"]) <= coords
    manifest = json.loads(next((out / "runs").glob("*.json")).read_text())
    assert manifest["spec_hash"] == spec.spec_hash() and manifest["summary"]["chips_written"] == summary.chips_written


def test_index_columns_read_in_one_pass_equal_what_xarray_decodes(demo_run):
    from eoprep.sinks import ChipStore
    from eoprep.sinks._index import _COLUMNS, _xarray_columns

    _, _, out = demo_run
    url = str(out / "chips.zarr")
    padded = False
    for key in ("s1", "s2"):
        fast, slow = ChipStore(url).columns(key, _COLUMNS), _xarray_columns(url, key)
        assert fast is not None, "the one-pass read gave up on arrays the pipeline wrote"
        padded |= bool(np.isnat(slow["datetime"]).any())
        for name in _COLUMNS:
            np.testing.assert_array_equal(fast[name], slow[name], err_msg=f"{key}/{name}")
            assert fast[name].dtype.kind == slow[name].dtype.kind, name
    assert padded, "no padded (NaT) time slot: the fill value's decoding was not exercised"


def _xarray_allocation(url: str, attrs, spec, layouts, plans, codecs) -> None:
    """The store as xarray's ``to_zarr(compute=False)`` creates it from the same datasets and encodings."""
    from eoprep.sinks._zarr import _encoding, _lazy_pixels, _metadata_dataset

    zarr.open_group(url, mode="w", zarr_format=3, attributes=attrs)
    for key, layout in layouts.items():
        encoding = _encoding(layout, plans[0].grid.size, spec.output.chips_per_shard, (codecs or {}).get(key))
        _lazy_pixels(_metadata_dataset(plans, layout)).to_zarr(
            url,
            group=key,
            mode="w-",
            compute=False,
            zarr_format=3,
            consolidated=False,
            encoding=encoding,
            safe_chunks=False,
        )


def _same_files(ours: Path, theirs: Path) -> None:
    """The two stores hold the same objects: equal metadata documents, equal chunk bytes."""
    files = sorted(p.relative_to(theirs) for p in theirs.rglob("*") if p.is_file())
    assert sorted(p.relative_to(ours) for p in ours.rglob("*") if p.is_file()) == files
    for name in files:
        if name.name == "zarr.json":
            assert json.loads((ours / name).read_text()) == json.loads((theirs / name).read_text()), name
        else:
            assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name


@pytest.mark.parametrize("codec", [None, {"name": "zstd", "level": 5}, {"name": "lerc", "max_error": 0.5}])
def test_a_store_is_created_and_extended_as_xarray_would_write_it(stac_api, tmp_path, monkeypatch, codec):
    from eoprep.chips import collection_layout, plan_chips
    from eoprep.grid import GlobalGrid
    from eoprep.pipeline import _zarr_codecs
    from eoprep.sinks import ChipStore
    from eoprep.sources import aoi_geometry, search_items

    spec = make_spec(tmp_path / "unused", output__codec=codec)  # S2 uint16 and S1 float32 with NaN nodata
    grid = GlobalGrid(cell_size=spec.grid.cell_size, pixel_size=spec.grid.pixel_size)
    aoi = aoi_geometry(spec.source.aoi)
    items = search_items(spec.source, url=stac_api, aoi=aoi)
    layouts = {c.key: collection_layout(spec, c, items[c.key]) for c in spec.source.collections}
    plans, _ = plan_chips(spec, grid, grid.cells_in_geometry(aoi), items, layouts)
    codecs, half = _zarr_codecs(spec, layouts), len(plans) // 2
    ours, theirs = tmp_path / "eoprep.zarr", tmp_path / "xarray.zarr"
    assert ChipStore(str(ours)).allocate(spec, layouts, plans[:half], codecs) == range(half)
    _xarray_allocation(str(theirs), dict(zarr.open_group(str(ours)).attrs), spec, layouts, plans[:half], codecs)
    _same_files(ours, theirs)
    assert any("coordinates" in json.loads((ours / k / "zarr.json").read_text())["attributes"] for k in layouts)

    assert ChipStore(str(ours)).allocate(spec, layouts, plans[half:], codecs) == range(half, len(plans))
    monkeypatch.setattr(ChipStore, "_append", lambda *_: False)  # as for a store it cannot append to: xarray
    ChipStore(str(theirs)).allocate(spec, layouts, plans[half:], codecs)
    _same_files(ours, theirs)


def test_cloud_fraction_follows_scl(demo_run):
    _, _, out = demo_run
    ds = xr.open_zarr(out / "chips.zarr", group="s2")
    pixels = ds["pixels"].values
    scl = pixels[:, :, list(ds["band"].values).index("SCL")]
    valid = (pixels != 0).all(axis=2)
    per_chip = [np.isin(scl[i], (8, 9, 10))[valid[i]].mean() for i in range(ds.sizes["chip"])]
    np.testing.assert_allclose(ds["cloud_fraction"].values, per_chip, rtol=1e-5)
    assert 0 < min(per_chip) < max(per_chip) < 1


def test_rerun_writes_nothing_and_extension_appends_without_touching_full_shards(demo_run, stac_api, client, tmp_path):
    spec, summary, out = demo_run
    again = run_pipeline(spec, client=client, catalog_url=stac_api, say=_quiet)
    assert again.chips_written == 0 and again.chips_present == summary.chips_planned and again.bytes_written == 0

    shard_dir = out / "chips.zarr" / "s2" / "pixels" / "c"
    n0 = summary.chips_planned
    full = [p for p in shard_dir.rglob("*") if p.is_file() and int(p.relative_to(shard_dir).parts[0]) < n0 // 4]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in full}
    west, south, east, north = TEST_BBOX
    wider = make_spec(out, source__aoi={"bbox": [west, south, east + 0.02, north]})
    extended = run_pipeline(wider, client=client, catalog_url=stac_api, say=_quiet)
    assert extended.chips_present == n0 and extended.chips_written > 0
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in full} == before
    ds = xr.open_zarr(out / "chips.zarr", group="s2")
    assert ds.sizes["chip"] == n0 + extended.chips_written and bool(ds["written"].all())
    assert len(gpd.read_parquet(out / "index.parquet").query("collection == 's2'")) == ds.sizes["chip"]
    # the appended chips' metadata (times, strings, transforms) and pixels are what a clean run of the wider AOI holds
    clean = tmp_path / "clean"
    run_pipeline(
        make_spec(clean, source__aoi=wider.source.aoi.model_dump()), client=client, catalog_url=stac_api, say=_quiet
    )
    for group in ("s2", "s1"):
        a = xr.open_zarr(out / "chips.zarr", group=group)
        b = xr.open_zarr(clean / "chips.zarr", group=group)
        a, b = a.isel(chip=np.argsort(a["chip"].values)), b.isel(chip=np.argsort(b["chip"].values))
        assert a.identical(b.assign_attrs(a.attrs)), group
        assert {k: a[k].encoding.get("units") for k in a.variables} == {
            k: b[k].encoding.get("units") for k in b.variables
        }


def test_odc_stac_and_stackstac_give_the_same_pixels(stac_api, client, tmp_path):
    a = run_pipeline(make_spec(tmp_path / "odc"), client=client, catalog_url=stac_api, say=_quiet)
    b = run_pipeline(
        make_spec(tmp_path / "ss", loader__engine="stackstac"), client=client, catalog_url=stac_api, say=_quiet
    )
    assert a.chips_written == b.chips_written > 0
    for group in ("s2", "s1"):
        x = xr.open_zarr(tmp_path / "odc" / "chips.zarr", group=group)["pixels"].values
        y = xr.open_zarr(tmp_path / "ss" / "chips.zarr", group=group)["pixels"].values
        np.testing.assert_array_equal(x, y)


def test_composite_mode_takes_the_median_of_clear_pixels(stac_api, client, tmp_path):
    spec = make_spec(
        tmp_path / "out",
        time__mode="composite",
        time__period="MS",
        source__collections=[{"id": "demo-sentinel-2-l2a", "name": "s2", "bands": ["B04", "SCL"]}],
    )
    summary = run_pipeline(spec, client=client, catalog_url=stac_api, say=_quiet)
    assert summary.chips_written > 0
    ds = xr.open_zarr(tmp_path / "out" / "chips.zarr", group="s2")
    assert ds.sizes["time"] == 3
    months = ds["datetime"].isel(chip=0).values.astype("datetime64[M]").astype(str).tolist()
    assert months == ["2024-05", "2024-06", "2024-07"]
    scl = ds["pixels"].sel(band="SCL").values
    assert not np.isin(scl[ds["pixels"].sel(band="B04").values > 0], (3, 8, 9, 10)).any()


def test_a_corrupt_cog_is_skipped_and_recorded(stac_api, client, tmp_path):
    spec = make_spec(tmp_path / "out", source__collections=[{"id": BROKEN_COLLECTION, "bands": ["B04", "SCL"]}])
    summary = run_pipeline(spec, client=client, catalog_url=stac_api, say=_quiet)
    assert summary.chips_written == 0 and len(summary.skipped) == summary.chips_planned
    assert all("RasterioIOError" in reason or "read" in reason.lower() for _, reason in summary.skipped)
    ds = xr.open_zarr(tmp_path / "out" / "chips.zarr", group=BROKEN_COLLECTION.replace("-", "_"))
    assert not bool(ds["written"].any())
    manifest = json.loads(next((tmp_path / "out" / "runs").glob("*.json")).read_text())
    assert len(manifest["summary"]["skipped"]) == summary.chips_planned


def test_a_corrupt_cog_fails_the_run_under_on_error_fail(stac_api, client, tmp_path):
    spec = make_spec(
        tmp_path / "out", loader__on_error="fail", source__collections=[{"id": BROKEN_COLLECTION, "bands": ["B04"]}]
    )
    with pytest.raises(EoprepError, match=r"chip R\w+_20240501-20240731: reads failed after 1 retries"):
        run_pipeline(spec, client=client, catalog_url=stac_api, say=_quiet)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"source__collections": [{"id": "demo-sentinel-2-l2a", "bands": ["B02", "B99"]}]},
            r"source.collections\[0\].bands: \['B99'\] not among the assets",
        ),
        ({"source__datetime": "2019-01-01/2019-02-01"}, r"found no items"),
        ({"source__aoi": {"bbox": [500000, 5025000, 505000, 5030000]}}, r"source.aoi.bbox: bbox .* not lon/lat"),
        ({"source__collections": [{"id": "no-such-collection", "bands": ["B02"]}]}, r"no-such-collection"),
    ],
)
def test_bad_input_fails_before_writing_anything(stac_api, client, tmp_path, change, message):
    out = tmp_path / "out"
    with pytest.raises(EoprepError, match=message):
        run_pipeline(make_spec(out, **change), client=client, catalog_url=stac_api, say=_quiet)
    assert not out.exists()


def test_a_client_getter_is_called_once_the_spec_is_planned(stac_api, client, tmp_path):
    calls: list[int] = []

    def started():
        calls.append(1)
        time.sleep(1.0)  # a cluster still starting
        return client

    with pytest.raises(EoprepError, match="found no items"):
        run_pipeline(
            make_spec(tmp_path / "none", source__datetime="2019-01-01/2019-02-01"),
            client=started,
            catalog_url=stac_api,
            say=_quiet,
        )
    assert calls == [], "bad input waited for the cluster"
    wall = time.perf_counter()
    fresh = run_pipeline(make_spec(tmp_path / "fresh"), client=started, catalog_url=stac_api, say=_quiet)
    wall = time.perf_counter() - wall
    assert calls == [1] and fresh.chips_written == fresh.chips_planned > 0
    assert fresh.seconds <= wall - 0.9, "the wait for the cluster was counted as the run's time"


def test_a_cluster_that_cannot_start_leaves_no_output(stac_api, tmp_path):
    def failed():
        raise EoprepError("--scheduler: cannot connect to the Dask scheduler at tcp://127.0.0.1:9")

    out = tmp_path / "out"
    with pytest.raises(EoprepError, match="cannot connect"):
        run_pipeline(make_spec(out), client=failed, catalog_url=stac_api, say=_quiet)
    assert not out.exists()


def test_an_output_path_that_is_a_file_is_refused_and_left_alone(stac_api, client, tmp_path):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    with pytest.raises(EoprepError, match=r"notes.txt: cannot hold an output \(it exists and is not a folder\)"):
        run_pipeline(make_spec(taken), client=client, catalog_url=stac_api, say=_quiet)
    assert taken.read_text() == "mine"


def test_an_output_of_an_older_layout_is_refused_and_left_alone(demo_run, stac_api, client, tmp_path):
    import shutil

    _, _, out = demo_run
    old = tmp_path / "old"
    shutil.copytree(out, old)
    shutil.rmtree(old / "chips.zarr" / "s2" / "inputs")  # as written before chips recorded their inputs
    (old / "chips.zarr" / "zarr.json").write_text(  # drop the consolidated listing that still names it
        json.dumps(
            {
                k: v
                for k, v in json.loads((old / "chips.zarr" / "zarr.json").read_text()).items()
                if k != "consolidated_metadata"
            }
        )
    )
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    with pytest.raises(EoprepError, match=r"output.path: group 's2' of .* lacks \['inputs'\].*new output path"):
        run_pipeline(make_spec(old), client=client, catalog_url=stac_api, say=_quiet)
    assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("added_first", [True, False])
def test_a_spec_that_adds_a_collection_is_refused_and_the_output_left_alone(
    demo_run, stac_api, client, tmp_path, added_first
):
    import shutil

    spec, _, out = demo_run
    old = tmp_path / "old"
    shutil.copytree(out, old)
    collections = [c.model_dump(mode="json", exclude_none=True) for c in spec.source.collections]
    added = {"id": "demo-landsat-c2-l2", "name": "landsat", "bands": ["red"]}
    wider = [added, *collections] if added_first else [*collections, added]
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    with pytest.raises(
        EoprepError, match=r"output.path: .* holds the collections \['s2', 's1'\] but not \['landsat'\]"
    ):
        run_pipeline(make_spec(old, source__collections=wider), client=client, catalog_url=stac_api, say=_quiet)
    assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before


def test_aoi_in_a_projected_crs_is_reprojected(stac_api, client, tmp_path):
    from pyproj import Transformer

    to_utm = Transformer.from_crs("EPSG:4326", "EPSG:32632", always_xy=True)
    bbox = to_utm.transform_bounds(*TEST_BBOX)
    spec = make_spec(tmp_path / "out", source__aoi={"bbox": list(bbox), "crs": "EPSG:32632"})
    summary = run_pipeline(spec, client=client, catalog_url=stac_api, say=_quiet)
    assert summary.chips_written >= 4


def test_unreachable_api_is_one_line(client, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(EoprepError, match=r"^source.url: cannot reach the STAC API at http://127.0.0.1:9/"):
        run_pipeline(make_spec(out), client=client, catalog_url="http://127.0.0.1:9/", say=_quiet)
    assert not out.exists()


def test_demo_sensors_carry_their_known_shift(demo_archive):
    shifts = {i["collection"]: tuple(i["properties"]["eoprep:true_shift"]) for i in demo_archive.items}
    assert shifts["demo-sentinel-1-rtc"] == SENSOR_SHIFTS["sentinel-1"] != (0.0, 0.0)
    assert Path(demo_archive.items[0]["assets"]["B02"]["href"].removeprefix("file://")).exists()


def test_neighbouring_shards_run_on_the_same_worker(stac_api, client, tmp_path):
    from distributed import get_task_stream

    spec = make_spec(tmp_path / "out", output={"path": str(tmp_path / "out"), "chips_per_shard": 1})
    with get_task_stream(client) as stream:
        summary = run_pipeline(spec, client=client, catalog_url=stac_api, say=_quiet)
    shards = sorted(
        (int(t["key"].split("-")[2]), t["worker"]) for t in stream.data if str(t["key"]).startswith("eoprep-shard-")
    )
    assert len(shards) == summary.chips_written >= 6
    assert len({worker for _, worker in shards}) == 2, "one worker did all the work"
    same = sum(a[1] == b[1] for a, b in zip(shards, shards[1:], strict=False))
    assert same >= len(shards) - 3, f"neighbouring shards scattered over workers: {shards}"
