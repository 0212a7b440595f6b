"""The embedded STAC API, end to end: real PostgreSQL + pgstac + stac-fastapi, queried with pystac-client.

One server for the whole module (a cold start creates a cluster); tests that change the catalog put
it back as they found it, so they pass in any order.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pystac_client import Client

from eoprep.catalog_server import CatalogServerError, LocalStacServer, default_data_dir

COLLECTION_ID = "eoprep-test-s2"
# (id, datetime, eo:cloud_cover, lower-left corner in lon/lat); each item covers 0.1 x 0.1 degrees.
ITEM_SPECS = [
    ("s2-a", "2024-05-01T10:00:00Z", 5.0, (12.0, 45.0)),
    ("s2-b", "2024-05-11T10:00:00Z", 35.0, (12.0, 45.0)),
    ("s2-c", "2024-05-21T10:00:00Z", 12.5, (12.0, 45.0)),
    ("s2-d", "2024-06-10T10:00:00Z", 80.0, (12.0, 45.0)),
    ("s2-e", "2024-05-15T10:00:00Z", 2.0, (20.0, 50.0)),
]


def _collection() -> dict[str, Any]:
    return {
        "type": "Collection",
        "stac_version": "1.1.0",
        "id": COLLECTION_ID,
        "description": "Synthetic Sentinel-2-like items for the catalog server tests",
        "license": "CC-BY-4.0",
        "links": [],
        "extent": {
            "spatial": {"bbox": [[12.0, 45.0, 20.1, 50.1]]},
            "temporal": {"interval": [["2024-05-01T00:00:00Z", "2024-06-30T23:59:59Z"]]},
        },
    }


def _item(item_id: str, when: str, cloud: float, corner: tuple[float, float], root: Path) -> dict[str, Any]:
    x0, y0 = corner
    x1, y1 = x0 + 0.1, y0 + 0.1
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "stac_extensions": [
            "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
            "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
        ],
        "id": item_id,
        "collection": COLLECTION_ID,
        "geometry": {
            "type": "Polygon",
            "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]],
        },
        "bbox": [x0, y0, x1, y1],
        "properties": {
            "datetime": when,
            "eo:cloud_cover": cloud,
            "proj:code": "EPSG:32633",
            "proj:shape": [1000, 1000],
            "proj:transform": [10.0, 0.0, 300000.0, 0.0, -10.0, 5000000.0, 0.0, 0.0, 1.0],
        },
        "links": [],
        "assets": {
            "B04": {
                "href": (root / f"{item_id}_B04.tif").as_uri(),
                "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                "roles": ["data"],
            }
        },
    }


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LocalStacServer, list[dict[str, Any]]]]:
    """A started server loaded with one collection and five items; destroyed afterwards."""
    data_dir = tmp_path_factory.mktemp("catalog")
    assets = tmp_path_factory.mktemp("assets")
    items = [_item(i, when, cloud, corner, assets) for i, when, cloud, corner in ITEM_SPECS]
    server = LocalStacServer(data_dir)
    try:
        server.start()
        server.load([_collection()], items)
        yield server, items
    finally:
        server.destroy()


def _ids(server: LocalStacServer, **search: Any) -> list[str]:
    client = Client.open(server.url)
    return [item.id for item in client.search(collections=[COLLECTION_ID], **search).items()]


def test_bbox_and_datetime(served: tuple[LocalStacServer, list[dict[str, Any]]]) -> None:
    server, _ = served
    found = _ids(server, bbox=[11.9, 44.9, 12.2, 45.2], datetime="2024-05-01/2024-05-31")
    assert sorted(found) == ["s2-a", "s2-b", "s2-c"]


# pystac-client 0.9 only recognises v1.0.x conformance URIs, stac-fastapi 7 advertises sort as v1.1.0:
# the client warns but still sends sortby, and the server honours it (asserted below).
@pytest.mark.filterwarnings("ignore::pystac_client.warnings.DoesNotConformTo")
def test_query_filter_and_sortby(served: tuple[LocalStacServer, list[dict[str, Any]]]) -> None:
    server, _ = served
    assert sorted(_ids(server, query={"eo:cloud_cover": {"lt": 20}})) == ["s2-a", "s2-c", "s2-e"]
    cql2 = {
        "op": "and",
        "args": [
            {"op": ">=", "args": [{"property": "eo:cloud_cover"}, 10]},
            {"op": "<", "args": [{"property": "datetime"}, {"timestamp": "2024-06-01T00:00:00Z"}]},
        ],
    }
    assert sorted(_ids(server, filter=cql2, filter_lang="cql2-json")) == ["s2-b", "s2-c"]
    by_cloud = _ids(server, sortby=[{"field": "properties.eo:cloud_cover", "direction": "desc"}])
    assert by_cloud == ["s2-d", "s2-b", "s2-c", "s2-a", "s2-e"]


def test_paging_and_items(served: tuple[LocalStacServer, list[dict[str, Any]]]) -> None:
    server, items = served
    search = Client.open(server.url).search(collections=[COLLECTION_ID], limit=2)
    pages = list(search.pages())
    assert [len(page.items) for page in pages] == [2, 2, 1]
    got = {item.id: item for page in pages for item in page.items}
    assert sorted(got) == sorted(spec[0] for spec in ITEM_SPECS)
    first = got["s2-a"]
    assert first.assets["B04"].href == items[0]["assets"]["B04"]["href"]
    assert first.assets["B04"].href.startswith("file:///")
    assert first.properties["proj:code"] == "EPSG:32633"


def test_upsert_replaces_and_reload_is_noop(served: tuple[LocalStacServer, list[dict[str, Any]]]) -> None:
    server, items = served
    changed = copy.deepcopy(items[1])
    changed["properties"]["eo:cloud_cover"] = 1.0
    try:
        server.load([_collection()], [changed])
        assert "s2-b" in _ids(server, query={"eo:cloud_cover": {"lt": 20}})
        assert len(_ids(server)) == len(ITEM_SPECS)
    finally:
        server.load([_collection()], items)
    assert "s2-b" not in _ids(server, query={"eo:cloud_cover": {"lt": 20}})
    assert len(_ids(server)) == len(ITEM_SPECS)


def test_restart_keeps_data_and_handles_stale_pid(
    served: tuple[LocalStacServer, list[dict[str, Any]]],
) -> None:
    server, _ = served
    assert server.start() == server.url  # idempotent while running
    server.stop()
    server.stop()  # idempotent when stopped
    # A killed run leaves postmaster.pid behind; a PID now used by another program (here: us).
    (server.pgdata / "postmaster.pid").write_text(f"{os.getpid()}\n{server.pgdata}\n")
    url = server.start()
    assert url.startswith("http://127.0.0.1:")
    assert sorted(_ids(server)) == sorted(spec[0] for spec in ITEM_SPECS)


def test_second_server_on_same_dir_is_refused(served: tuple[LocalStacServer, list[dict[str, Any]]]) -> None:
    server, _ = served
    with pytest.raises(CatalogServerError, match="already served"):
        LocalStacServer(server.data_dir).start()


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EOPREP_CACHE", str(tmp_path / "cache"))
    assert default_data_dir() == tmp_path / "cache" / "catalog"
    monkeypatch.delenv("EOPREP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "eoprep" / "catalog"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir() == tmp_path / "home" / ".cache" / "eoprep" / "catalog"
