"""AOIs from a bbox or a GeoJSON file: every usable form is read, every broken one is a one-line error."""

from __future__ import annotations

import json

import pytest
import shapely

from eoprep.config import AoiSpec
from eoprep.errors import EoprepError
from eoprep.sources import aoi_geometry

SQUARE = {"type": "Polygon", "coordinates": [[[9.0, 45.4], [9.1, 45.4], [9.1, 45.5], [9.0, 45.5], [9.0, 45.4]]]}


def _aoi(tmp_path, doc, **kw) -> AoiSpec:
    path = tmp_path / "aoi.geojson"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return AoiSpec(geojson=path, **kw)


@pytest.mark.parametrize(
    "doc",
    [
        SQUARE,
        {"type": "Feature", "properties": {}, "geometry": SQUARE},
        {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, "geometry": SQUARE}]},
    ],
)
def test_geometry_feature_and_collection_give_the_same_aoi(tmp_path, doc):
    assert aoi_geometry(_aoi(tmp_path, doc)).equals(shapely.geometry.shape(SQUARE))


def test_a_geojson_in_a_projected_crs_is_reprojected_to_lon_lat(tmp_path):
    utm = {
        "type": "Polygon",
        "coordinates": [[[500000, 5030000], [505000, 5030000], [505000, 5035000], [500000, 5030000]]],
    }
    west, south, east, north = aoi_geometry(_aoi(tmp_path, utm, crs="EPSG:32632")).bounds
    assert 8.99 < west < east < 9.07 and 45.4 < south < north < 45.5


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"type": "Point"}, r"is not a GeoJSON geometry, Feature or FeatureCollection \(KeyError"),
        ([1, 2, 3], r"is not a GeoJSON geometry, Feature or FeatureCollection \(AttributeError"),
        ({"type": "Feature", "properties": {}}, r"is not a GeoJSON geometry, Feature or FeatureCollection \(KeyError"),
        ({"type": "FeatureCollection", "features": []}, r"holds no geometry"),
        ({"type": "Point", "coordinates": [9.0, 45.4]}, r"the area of interest is empty"),
        ("{not json", r"is not JSON"),
    ],
)
def test_a_broken_geojson_is_a_one_line_error_naming_the_field_and_file(tmp_path, doc, message):
    with pytest.raises(EoprepError, match=r"source.aoi.geojson.*aoi.geojson.*") as info:
        aoi_geometry(_aoi(tmp_path, doc))
    assert len(str(info.value).splitlines()) == 1
    assert info.match(message)
