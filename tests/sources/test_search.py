"""Searching the real local pgstac API: what is asked of it."""

from __future__ import annotations

import requests

from conftest import make_spec
from eoprep.sources import search_items


def test_a_search_reads_the_landing_page_once(stac_api, tmp_path, monkeypatch):
    sent: list[tuple[str, str]] = []
    send = requests.Session.send

    def spy(self, request, **kwargs):
        sent.append((request.method, request.url.rstrip("/")))
        return send(self, request, **kwargs)

    monkeypatch.setattr(requests.Session, "send", spy)
    spec = make_spec(tmp_path / "out")
    found = search_items(spec.source, url=stac_api)
    assert found and all(found.values())
    assert sent.count(("GET", stac_api.rstrip("/"))) == 1, sent
    assert sent.count(("POST", f"{stac_api.rstrip('/')}/search")) == len(spec.source.collections)
