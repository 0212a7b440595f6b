"""The embedded default: the demo archive served by a local pgstac STAC API, started on demand."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from eoprep import __version__
from eoprep.catalog_server import LocalStacServer, default_data_dir
from eoprep.demo import DEMO_BBOX, DemoArchive, generate_archive

__all__ = ["demo_archive", "embedded_catalog"]

_MARKER = "archive.json"


def demo_archive(
    root: Path | None = None,
    *,
    bbox: tuple[float, float, float, float] = DEMO_BBOX,
    say: Callable[[str], None] = print,
) -> DemoArchive:
    """The demo archive of ``bbox`` under ``root``, generated once and reused while eoprep's version is unchanged."""
    root = root or default_data_dir() / "demo-archive"
    marker = root / _MARKER
    if marker.exists():
        meta = json.loads(marker.read_text())
        if meta.get("version") == __version__ and tuple(meta.get("bbox", ())) == tuple(bbox):
            doc = json.loads((root / "catalog.json").read_text())
            return DemoArchive(
                root=root,
                bbox=tuple(meta["bbox"]),
                datetime=meta["datetime"],
                collections=doc["collections"],
                items=doc["items"],
            )
    say(f"generating the demo archive in {root}")
    archive = generate_archive(root, bbox=bbox, progress=lambda msg: say(f"  {msg}"))
    marker.write_text(json.dumps({"version": __version__, "bbox": archive.bbox, "datetime": archive.datetime}))
    return archive


@contextmanager
def embedded_catalog(
    data_dir: Path | None = None, *, port: int | None = None, say: Callable[[str], None] = print
) -> Iterator[str]:
    """Serve the demo archive from a real PostgreSQL/pgstac database; yields the STAC API URL."""
    data_dir = data_dir or default_data_dir()
    archive = demo_archive(data_dir / "demo-archive", say=say)
    with LocalStacServer(data_dir, port=port, log=say) as server:
        server.load(archive.collections, archive.items)
        say(f"embedded STAC API at {server.url} ({len(archive.items)} items)")
        yield server.url
