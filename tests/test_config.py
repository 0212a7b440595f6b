"""Pipeline specs: valid specs load, bad ones fail with one line naming the file and key."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from eoprep.config import load_spec, split_range
from eoprep.errors import SpecError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_pipeline_specs_validate(path):
    if "embed" in path.name:
        pytest.skip("embedding specs have their own schema")
    spec = load_spec(path)
    assert spec.source.collections and spec.grid.cell_size % spec.grid.pixel_size == 0


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def _demo() -> dict:
    return yaml.safe_load((ROOT / "pipelines" / "demo.yaml").read_text())


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["grid"].pop("pixel_size"), r"spec.yaml: grid.pixel_size: Field required"),
        (lambda d: d["grid"].update(pixel_size=7), r"grid: .*cell_size 2560.* not a multiple of pixel_size 7"),
        (lambda d: d["source"].update(datetime="2024-05-01"), r"source.datetime: .*closed range"),
        (lambda d: d["source"]["aoi"].update(bbox=[500000, 5e6, 501000, 5.001e6]), r"source.aoi.bbox: .*not lon/lat"),
        (lambda d: d["source"].update(colections=[]), r"source.colections: Extra inputs are not permitted"),
        (
            lambda d: d["loader"].update(engine="gdal"),
            r"loader.engine: Input should be 'odc-stac', 'stackstac', 'rasterio' or 'earthengine'",
        ),
        (lambda d: d["time"].update(mode="composite"), r"time: mode 'composite' needs `period`"),
        (lambda d: d["time"].update(window="fortnight"), r"time.window: .*not a frequency"),
        (lambda d: d["source"]["collections"][0].update(bands=[]), r"source.collections.0.bands: List should have"),
        (lambda d: d["output"].update(codec={"name": "h265", "bit_depth": 14}), r"output.codec"),
    ],
)
def test_bad_specs_name_file_and_key(tmp_path, mutate, message):
    data = _demo()
    mutate(data)
    with pytest.raises(SpecError, match=message) as info:
        load_spec(_write(tmp_path, data))
    assert "\n" not in str(info.value)


def test_yaml_syntax_error_names_the_line(tmp_path):
    with pytest.raises(SpecError, match=r"spec.yaml: line 3: not valid YAML"):
        load_spec(_write(tmp_path, "name: x\nsource: [unclosed\n"))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(SpecError, match=r"nope.yaml: cannot read spec"):
        load_spec(tmp_path / "nope.yaml")


def test_geojson_aoi_is_resolved_next_to_the_spec(tmp_path):
    data = _demo()
    data["source"]["aoi"] = {"geojson": "aoi.geojson"}
    spec = load_spec(_write(tmp_path, data))
    assert spec.source.aoi.geojson == tmp_path / "aoi.geojson"


def test_windows_split_the_range_at_frequency_boundaries():
    start, end = pd.Timestamp("2024-05-01", tz="UTC"), pd.Timestamp("2024-07-31 23:59", tz="UTC")
    pieces = split_range(start, end, "MS")
    assert [a.month for a, _ in pieces] == [5, 6, 7]
    assert pieces[0][1] == pieces[1][0] and pieces[-1][1] == end
    assert split_range(start, end, None) == [(start, end)]


def test_spec_hash_is_stable_and_sensitive():
    a = load_spec(ROOT / "pipelines" / "demo.yaml")
    b = load_spec(ROOT / "pipelines" / "demo.yaml")
    assert a.spec_hash() == b.spec_hash()
    c = a.model_copy(update={"name": "other"})
    assert c.spec_hash() != a.spec_hash()


def test_public_source_specs_match_the_catalog_definitions():
    """Every collection a shipped spec searches is defined in catalog/sources with those asset keys."""
    import json

    defined: dict[tuple[str, str], set[str]] = {}
    for path in (ROOT / "catalog" / "sources").glob("*.json"):
        coll = json.loads(path.read_text())
        api = next(link["href"] for link in coll["links"] if link["rel"] == "via")
        defined[(api.rstrip("/"), coll["id"])] = set(coll["item_assets"])
    checked = 0
    for path in sorted((ROOT / "pipelines").glob("*.yaml")):
        if "embed" in path.name:
            continue
        spec = load_spec(path)
        if spec.source.kind != "stac" or spec.source.url == "embedded":
            continue
        for coll in spec.source.collections:
            assets = defined[(spec.source.url.rstrip("/"), coll.id)]
            assert set(coll.bands) <= assets, (path.name, coll.id)
            checked += 1
    assert checked >= 3
