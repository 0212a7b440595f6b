"""Shared fixtures: the demo archive, a real local STAC API serving it, and a real LocalCluster."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from eoprep.catalog_server import LocalStacServer
from eoprep.config import PipelineSpec, parse_spec
from eoprep.demo import DEMO_DATETIME, S2_COLLECTION, DemoArchive, generate_archive

#: A few cells of the demo AOI, small chips (128 px) so end-to-end tests stay quick on 2 cores.
TEST_BBOX = [9.020, 45.410, 9.045, 45.425]
BROKEN_COLLECTION = "test-broken-s2"


@pytest.fixture(scope="session")
def demo_archive(tmp_path_factory: pytest.TempPathFactory) -> DemoArchive:
    return generate_archive(tmp_path_factory.mktemp("demo-archive"))


def _broken_copy(archive: DemoArchive, root: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A copy of the S2 collection whose third scene has a truncated (corrupt) B04 COG."""
    coll = copy.deepcopy(next(c for c in archive.collections if c["id"] == S2_COLLECTION))
    coll["id"] = BROKEN_COLLECTION
    items = []
    for i, item in enumerate(i for i in archive.items if i["collection"] == S2_COLLECTION):
        item = copy.deepcopy(item)
        item["collection"] = BROKEN_COLLECTION
        if i == 2:
            src = Path(item["assets"]["B04"]["href"].removeprefix("file://"))
            bad = root / "corrupt-B04.tif"
            bad.write_bytes(src.read_bytes()[: src.stat().st_size // 3])
            item["assets"]["B04"]["href"] = bad.as_uri()
        items.append(item)
    return coll, items


@pytest.fixture(scope="session")
def stac_server(demo_archive: DemoArchive, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStacServer]:
    """The demo archive (plus a collection with one corrupt COG) served by a real pgstac STAC API.

    Tests that add or change items do so in collections of their own, so the demo stays as generated.
    """
    root = tmp_path_factory.mktemp("catalog")
    broken, broken_items = _broken_copy(demo_archive, root)
    server = LocalStacServer(root)
    server.start()
    try:
        server.load([*demo_archive.collections, broken], [*demo_archive.items, *broken_items])
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def stac_api(stac_server: LocalStacServer) -> str:
    return stac_server.url


@pytest.fixture(scope="session")
def client() -> Iterator[Any]:
    """A real distributed LocalCluster with two worker processes."""
    from eoprep.runtime import dask_client

    with dask_client(workers=2, say=lambda _m: None) as c:
        yield c


def make_spec(out: Path, **changes: Any) -> PipelineSpec:
    """The test spec (S2 + S1 over a few demo cells), with dotted-key overrides like ``time__mode``."""
    data: dict[str, Any] = {
        "name": "test",
        "source": {
            "url": "embedded",
            "collections": [
                {"id": S2_COLLECTION, "name": "s2", "bands": ["B02", "B03", "B04", "B08", "B11", "B12", "SCL"]},
                {"id": "demo-sentinel-1-rtc", "name": "s1", "bands": ["vv", "vh"]},
            ],
            "aoi": {"bbox": TEST_BBOX},
            "datetime": DEMO_DATETIME,
        },
        "grid": {"cell_size": 1280, "pixel_size": 10},
        "time": {"mode": "scenes", "max_scenes": 8},
        "loader": {"engine": "odc-stac", "retries": 1, "backoff": 0.01},
        "output": {"path": str(out), "chips_per_shard": 4},
    }
    for key, value in changes.items():
        *parents, leaf = key.split("__")
        node = data
        for p in parents:
            node = node[p]
        node[leaf] = value
    return parse_spec(json.loads(json.dumps(data)))
