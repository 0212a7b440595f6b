"""TACO output: shards written by tacotoolbox, read back by tacoreader, bit-for-bit equal to the Zarr store."""

from __future__ import annotations

import json
import zipfile

import pytest
import rasterio
import zarr

from conftest import TEST_BBOX, make_spec
from eoprep.pipeline import run_pipeline

tacoreader = pytest.importorskip("tacoreader")
pytestmark = pytest.mark.slow


def _quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def taco_run(stac_api, client, tmp_path_factory):
    out = tmp_path_factory.mktemp("taco") / "out"
    spec = make_spec(out, output__format="taco", output__taco_shard_size="3MB")
    summary = run_pipeline(spec, client=client, catalog_url=stac_api, say=_quiet)
    return spec, summary, out


def _zarr_chips(out):
    root = zarr.open_group(out / "chips.zarr", mode="r")
    ids = [str(v) for v in root["s2/chip"][:]]
    return root, {cid: i for i, cid in enumerate(ids)}


def test_every_taco_sample_equals_the_zarr_chip(taco_run):
    _, summary, out = taco_run
    shards = sorted((out / "taco").glob("*.tacozip"))
    assert len(shards) > 1 and all(s.stat().st_size < 3_000_000 + 2_000_000 for s in shards)
    ds = tacoreader.load(str(out / "taco" / ".tacocat"))
    table = ds.data.to_arrow().to_pandas()
    assert len(table) == summary.chips_written and table["id"].is_unique
    root, position = _zarr_chips(out)
    for row in range(len(table)):
        chip = table["id"][row]
        i = position[chip]
        assert table["eoprep:zarr_index"][row] == i and table["eoprep:cell"][row] == str(root["s2/cell"][i])
        assert list(table["stac:geotransform"][row]) == list(root["s2/transform"][i])
        assert table["stac:crs"][row] == str(root["s2/crs"][i])
        children = ds.data.read(row).to_arrow().to_pandas()
        assert sorted(children["id"]) == ["s1", "s2"]
        for _, child in children.iterrows():
            expected = root[f"{child['id']}/pixels"][i]
            with rasterio.open(child["internal:gdal_vsi"]) as src:
                got = src.read().reshape(tuple(child["stac:tensor_shape"]))
            assert got.dtype == expected.dtype
            assert got.tobytes() == expected.tobytes()  # bit for bit, NaN payloads included
            assert json.loads(child["eoprep:bands"]) == [str(b) for b in root[f"{child['id']}/band"][:]]
            assert child["eoprep:codec"] == "GTiff/ZSTD"
            assert child["eoprep:valid_fraction"] == pytest.approx(float(root[f"{child['id']}/valid_fraction"][i]))


def test_taco_shards_are_plain_zips_with_stac_metadata(taco_run):
    _, _, out = taco_run
    shard = sorted((out / "taco").glob("*.tacozip"))[0]
    with zipfile.ZipFile(shard) as zf:
        names = zf.namelist()
        assert all(info.compress_type == zipfile.ZIP_STORED for info in zf.infolist())
    assert names[0] == "TACO_HEADER" and "METADATA/level0.parquet" in names and "COLLECTION.json" in names
    ds = tacoreader.load(str(shard))
    columns = set(ds.data.to_arrow().column_names)
    assert {
        "stac:crs",
        "stac:tensor_shape",
        "stac:geotransform",
        "stac:time_start",
        "stac:time_end",
        "stac:centroid",
        "eoprep:cell",
    } <= columns


def test_a_wider_run_appends_new_shards_and_keeps_the_old_ones(taco_run, stac_api, client):
    spec, summary, out = taco_run
    before = {p: p.read_bytes() for p in (out / "taco").glob("*.tacozip")}
    west, south, east, north = TEST_BBOX
    wider = make_spec(
        out,
        output__format="taco",
        output__taco_shard_size="3MB",
        source__aoi={"bbox": [west, south, east + 0.02, north]},
    )
    extended = run_pipeline(wider, client=client, catalog_url=stac_api, say=_quiet)
    assert extended.chips_written > 0
    assert {p: p.read_bytes() for p in before} == before
    ids = tacoreader.load(str(out / "taco" / ".tacocat")).data.to_arrow().column("id").to_pylist()
    assert len(ids) == len(set(ids)) == summary.chips_written + extended.chips_written


def test_a_shard_that_does_not_read_is_replaced_by_its_chips_packed_again(taco_run, tmp_path):
    import shutil

    from eoprep.sinks import write_taco

    out = taco_run[2]
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    broken = sorted((copy / "taco").glob("*.tacozip"))[0]
    broken.write_bytes(broken.read_bytes()[:1000])  # truncated
    result = write_taco(copy, str(copy / "chips.zarr"), name="test", split_size="3MB", run_id="repair")
    assert result.replaced == 1 and result.chips > 0 and not broken.exists()
    ids = tacoreader.load(str(copy / "taco" / ".tacocat")).data.to_arrow().column("id").to_pylist()
    assert sorted(ids) == sorted(_zarr_chips(copy)[1])
