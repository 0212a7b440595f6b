"""End to end: a demo pipeline run (3 monthly windows) → `embed` on the LocalCluster → store, search, quality."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import xarray as xr
import yaml

from conftest import TEST_BBOX, make_spec
from eoprep.cli import main
from eoprep.demo import DEMO_BBOX, S2_COLLECTION
from eoprep.demo._archive import _scene_grid
from eoprep.demo._landscape import CLASSES, Landscape
from eoprep.embed import FeatureStore, embed, parse_embed_spec, search
from eoprep.errors import EoprepError
from eoprep.pipeline import run_pipeline

pytestmark = pytest.mark.slow

S2_BANDS = ["B02", "B03", "B04", "B08", "B11", "B12", "SCL"]


def _quiet(_msg: str) -> None:
    pass


def _embed_spec(chips, store, **encoder):
    return {
        "name": "test-embed",
        "input": {"path": str(chips), "group": "s2", "mask": {"band": "SCL", "invalid": [0, 3, 8, 9, 10]}},
        "encoder": encoder or {"name": "mosaiks", "params": {"seed": 7}},
        "runtime": {"device": "auto", "batch_size": 8, "chips_per_task": 8},
        "output": {"path": str(store)},
    }


@pytest.fixture(scope="module")
def chips(stac_api, client, tmp_path_factory):
    """S2 chips of a few cells over three monthly windows: the same place on different dates."""
    out = tmp_path_factory.mktemp("embed") / "chips"
    west, south, east, north = TEST_BBOX
    spec = make_spec(
        out,
        source__aoi={"bbox": [west, south, (west + east) / 2, north]},
        source__collections=[{"id": S2_COLLECTION, "name": "s2", "bands": S2_BANDS}],
        time__window="MS",
        time__max_scenes=3,
    )
    summary = run_pipeline(spec, client=client, catalog_url=stac_api, say=_quiet)
    assert summary.chips_written == summary.chips_planned
    return out


@pytest.fixture(scope="module")
def store(chips, client):
    path = chips.parent / "features"
    summary = embed(parse_embed_spec(_embed_spec(chips, path)), client=client, say=_quiet)
    return path, summary


def _dominant_cover(chips) -> dict[str, str]:
    """Land cover of each chip from the demo landscape itself (the archive's ground truth)."""
    g10 = _scene_grid(DEMO_BBOX, 10.0, 3000.0)
    extent = max(g10.width, g10.height) * 10.0
    land = Landscape(x_min=g10.x0, y_min=g10.y0 - g10.height * 10.0, extent=extent, seed=0)
    ds = xr.open_zarr(chips / "chips.zarr", group="s2")
    out = {}
    for i, cid in enumerate(ds["chip"].values):
        x = ds["easting"].values[i][None, ::4]
        y = ds["northing"].values[i][::4, None]
        counts = np.bincount(land.site(x, y).cls.ravel(), minlength=len(CLASSES))
        out[str(cid)] = CLASSES[int(counts.argmax())]
    return out


def test_store_holds_one_row_per_chip_in_parquet_zarr_and_stac(chips, store):
    path, summary = store
    ds = xr.open_zarr(chips / "chips.zarr", group="s2")
    assert summary.chips_encoded == ds.sizes["chip"] == summary.rows > 6
    assert summary.device == "cpu" and summary.dimension == 2 * 64 * 16 + 5 * 6
    table = pq.read_table(path / "features.parquet")
    assert table.schema.field("embedding").type.list_size == summary.dimension
    assert b"geo" in table.schema.metadata
    fs = FeatureStore(path)
    rows = fs.table()
    assert rows["id"].tolist() == [str(c) for c in ds["chip"].values]
    assert set(rows["sensor"]) == {S2_COLLECTION} and (rows["model"] == "mosaiks").all()
    assert rows.crs.to_epsg() == 4326 and (rows["valid_fraction"] > 0.5).all()
    vectors = fs.vectors()
    np.testing.assert_allclose(xr.open_zarr(path / "embeddings.zarr")["embedding"].values, vectors)
    assert np.isfinite(vectors).all() and len(np.unique(vectors.round(5), axis=0)) == len(vectors)
    collection = json.loads((path / "collection.json").read_text())
    meta = collection["eoprep:embedding"]
    assert meta["dimension"] == summary.dimension and meta["band_sources"]["B04"] == "B04"
    assert meta["normalisation"]["mean"] == [0.15] * 6 and meta["mask"]["band"] == "SCL"


def test_rerun_encodes_nothing_and_the_vectors_are_deterministic(chips, store, client, tmp_path):
    path, summary = store
    again = embed(parse_embed_spec(_embed_spec(chips, path)), client=client, say=_quiet)
    assert again.chips_encoded == 0 and again.chips_present == summary.rows
    fresh = embed(parse_embed_spec(_embed_spec(chips, tmp_path / "fresh")), client=client, say=_quiet)
    assert fresh.chips_encoded == summary.rows
    np.testing.assert_array_equal(FeatureStore(tmp_path / "fresh").vectors(), FeatureStore(path).vectors())


def test_appends_only_new_chips_and_refuses_another_model(chips, store, client, tmp_path):
    path, summary = store
    first = FeatureStore(path).table().iloc[:5]
    partial = tmp_path / "partial"
    vectors = FeatureStore(path).vectors()
    FeatureStore(partial).append(
        first.drop(columns="row"), vectors[:5], FeatureStore(path).metadata(), dtype="float32", ann_threshold=10_000
    )
    grown = embed(parse_embed_spec(_embed_spec(chips, partial)), client=client, say=_quiet)
    assert grown.chips_present == 5 and grown.chips_encoded == summary.rows - 5
    np.testing.assert_array_equal(FeatureStore(partial).vectors(), vectors)
    other = _embed_spec(chips, partial, name="mosaiks", params={"features": 16})
    with pytest.raises(EoprepError, match="another model or spec"):
        embed(parse_embed_spec(other), client=client, say=_quiet)


def test_every_worker_gets_a_task_and_batches_across_shards_read_the_same_pixels(chips, store, client, tmp_path):
    """chips_per_task above the job's size still gives each worker a task; batches of 3 cut across shards of 8."""
    from distributed import get_task_stream

    path, summary = store
    spec = _embed_spec(chips, tmp_path / "big")
    spec["runtime"] = {"device": "auto", "batch_size": 3, "chips_per_task": 4096, "read_threads": 3}
    with get_task_stream(client) as stream:
        big = embed(parse_embed_spec(spec), client=client, say=_quiet)
    tasks = [t for t in stream.data if str(t["key"]).startswith("encode_chips")]
    assert big.chips_encoded == summary.rows
    assert len(tasks) == 2 and len({t["worker"] for t in tasks}) == 2
    np.testing.assert_allclose(FeatureStore(tmp_path / "big").vectors(), FeatureStore(path).vectors(), rtol=1e-5)


def test_a_missing_shard_is_named_instead_of_read_as_nodata(chips, client, tmp_path):
    import shutil

    copy = tmp_path / "chips"
    shutil.copytree(chips, copy)
    (copy / "chips.zarr/s2/pixels/c/0/0/0/0/0").unlink()
    with pytest.raises(EoprepError, match=r"shard .*chips\.zarr/s2/pixels/c/0/0/0/0/0 is missing"):
        embed(parse_embed_spec(_embed_spec(copy, tmp_path / "store")), client=client, say=_quiet)
    assert not FeatureStore(tmp_path / "store").exists()


def test_same_place_on_other_dates_is_nearer_than_other_land_cover(chips, store):
    path, _ = store
    fs = FeatureStore(path)
    rows = fs.table()
    units = fs.vectors() / np.linalg.norm(fs.vectors(), axis=1, keepdims=True)
    cover = _dominant_cover(chips)
    cells = rows["cell"].to_numpy()
    labels = np.array([cover[c] for c in rows["id"]])
    k = int(rows.groupby("cell").size().min()) - 1
    hits, same, other = [], [], []
    for i, cid in enumerate(rows["id"]):
        found = search(path, chip=cid, k=k)
        hits.append(np.mean([rows.loc[rows["id"] == m, "cell"].item() == cells[i] for m in found["id"]]))
        sims = units @ units[i]
        same.append(sims[(cells == cells[i]) & (rows["id"] != cid)].mean())
        if (labels != labels[i]).any():
            other.append(sims[labels != labels[i]].mean())
    precision = float(np.mean(hits))
    print(
        f"\nprecision@{k} (same cell, other windows) over {len(rows)} chips: {precision:.3f}; "
        f"mean cosine same place {np.mean(same):.4f} vs other land cover {np.mean(other):.4f}"
    )
    assert len(set(labels)) >= 2 and k >= 2
    assert precision >= 0.8
    assert np.mean(same) > np.mean(other)


def test_search_api_and_cli(chips, store, capsys, tmp_path):
    path, summary = store
    rows = FeatureStore(path).table()
    query = rows["id"].iloc[0]
    top = search(path, chip=query, k=3)
    assert len(top) == 3 and query not in set(top["id"]) and top["score"].is_monotonic_decreasing
    vector = FeatureStore(path).vectors()[0]
    np.save(tmp_path / "q.npy", vector)
    by_vector = search(path, vector=vector, k=1)
    assert by_vector["id"].item() == query and by_vector["score"].item() == pytest.approx(1.0, abs=1e-5)
    one_cell = tuple(rows.geometry.iloc[0].buffer(-0.002).bounds)
    inside = search(path, vector=vector, bbox=one_cell, k=50)
    assert set(inside["cell"]) == {rows["cell"].iloc[0]} and len(inside) == 3
    assert main(["search", str(path), "--vector", str(tmp_path / "q.npy"), "-k", "2", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["rank"] for r in lines] == [1, 2] and lines[0]["id"] == query
    assert main(["search", str(path), "--bbox", *map(str, one_cell), "-k", "2", "--json"]) == 0
    found = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(found) == 2 and rows["cell"].iloc[0] not in {r["cell"] for r in found}
    assert main(["search", str(path), "--chip", "nope", "-k", "2"]) == 2


def test_ann_index_answers_like_exact_search(chips, store, client, tmp_path):
    path, _ = store
    spec = _embed_spec(chips, tmp_path / "ann")
    spec["output"]["ann_threshold"] = 4
    embed(parse_embed_spec(spec), client=client, say=_quiet)
    assert (tmp_path / "ann" / "ann.faiss").exists()
    query = FeatureStore(path).table()["id"].iloc[2]
    approx = search(tmp_path / "ann", chip=query, k=3, exact=False)
    exact = search(tmp_path / "ann", chip=query, k=3, exact=True)
    assert approx["id"].tolist() == exact["id"].tolist()


def test_cli_embed_runs_a_yaml_spec_on_an_existing_scheduler(chips, client, tmp_path, capsys):
    spec_file = tmp_path / "embed.yaml"
    spec_file.write_text(
        yaml.safe_dump(
            _embed_spec(chips, tmp_path / "cli-store", name="vit", params={"arch": "vit-t", "depth": 1, "size": 64})
        )
    )
    code = main(["embed", str(spec_file), "--scheduler", client.scheduler.address, "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model"] == "vit" and summary["dimension"] == 192 and summary["chips_encoded"] > 6


@pytest.mark.parametrize("shards", [None, (4, 2, 3, 8, 8)])
def test_the_chip_reader_gives_zarr_values_for_sharded_and_plain_arrays(tmp_path, shards):
    import zarr

    from eoprep.embed._run import _PixelReader

    url = str(tmp_path / "chips.zarr")
    arr = zarr.create_array(
        url, name="s2/pixels", shape=(10, 2, 3, 8, 8), dtype="uint16", chunks=(1, 2, 3, 8, 8), shards=shards
    )
    data = np.random.default_rng(1).integers(0, 65_535, arr.shape, dtype=np.uint16)
    data[5] = 0  # a chip of fill values only: not stored
    arr[:] = data
    reader = _PixelReader(url, "s2")
    positions = [9, 2, 3, 4, 5, 8, 0]
    buffer = reader.buffer(len(positions), pin=False)
    for where, part in reader.parts(positions):
        reader.read(part, buffer.numpy()[where])
    assert buffer.dtype == torch.int16
    np.testing.assert_array_equal(buffer.numpy().view(np.uint16), data[positions])
