from __future__ import annotations

import datetime as dt
import math
import re

import numpy as np
import pytest
import shapely
from pyproj import CRS, Transformer

from eoprep.grid import Cell, GlobalGrid, chip_id, parse_chip_id


@pytest.fixture(scope="module")
def grid() -> GlobalGrid:
    return GlobalGrid(cell_size=2560.0, pixel_size=10.0)


def _bounds_array(cells: list[Cell]) -> np.ndarray:
    return np.array([c.bounds for c in cells])


def _to_local_equal_area(geom: shapely.Geometry, lon: float, lat: float) -> shapely.Geometry:
    """Project a lon/lat geometry to an equal-area plane centred on (lon, lat), on WGS84."""
    crs = CRS.from_proj4(f"+proj=laea +lat_0={lat} +lon_0={lon} +datum=WGS84 +units=m")
    to_laea = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    dense = shapely.segmentize(geom, 1e-3)
    return shapely.transform(dense, lambda xy: np.column_stack(to_laea.transform(xy[:, 0], xy[:, 1])))


def _coverage(cell: Cell) -> tuple[float, float]:
    """Fraction of the cell covered by its chip, and the chip-to-cell centre offset in metres."""
    lon, lat = cell.polygon.centroid.coords[0]
    polygon = _to_local_equal_area(cell.polygon, lon, lat)
    footprint = _to_local_equal_area(cell.footprint, lon, lat)
    return polygon.intersection(footprint).area / polygon.area, polygon.centroid.distance(footprint.centroid)


@pytest.mark.parametrize(
    ("west", "south", "east", "north"),
    [
        (5.5, 44.9, 6.5, 45.1),  # UTM zone 31/32 boundary, mid latitudes
        (5.5, 59.95, 6.5, 60.05),
        (-0.1, -0.1, 0.1, 0.1),  # equator and Greenwich
    ],
)
def test_cells_tile_without_gaps_or_overlaps(grid, west, south, east, north):
    cells = grid.cells_in_bbox((west, south, east, north))
    bounds = _bounds_array(cells)
    lon, lat = np.meshgrid(np.linspace(west, east, 41), np.linspace(south, north, 37))
    lon, lat = lon.ravel(), lat.ravel()

    # Every point lies in exactly one half-open cell, and cell_at finds that cell.
    inside = (
        (bounds[:, None, 0] <= lon)
        & (lon < bounds[:, None, 2])
        & (bounds[:, None, 1] <= lat)
        & (lat < bounds[:, None, 3])
    )
    assert (inside.sum(axis=0) == 1).all()
    ids = [cells[i].id for i in inside.argmax(axis=0)]
    found = [grid.cell_at(x, y) for x, y in zip(lon, lat, strict=True)]
    assert [c.id for c in found] == ids
    assert all(c.polygon.covers(shapely.Point(x, y)) for c, x, y in zip(found, lon, lat, strict=True))

    # Cells share edges: their union has the summed area (no overlap) and covers the bbox (no gap).
    polygons = [c.polygon for c in cells]
    union = shapely.union_all(polygons)
    assert union.area == pytest.approx(sum(p.area for p in polygons), rel=1e-9)
    assert union.buffer(1e-9).covers(shapely.box(west, south, east, north))


def test_neighbours_share_edges(grid):
    cell = grid.cell_at(6.0, 45.0)
    west, south, east, north = cell.bounds
    assert grid.cell_at(west, south) == cell  # the south-west corner belongs to the cell
    east_neighbour = grid.cell_at(east, (south + north) / 2)
    north_neighbour = grid.cell_at((west + east) / 2, north)
    assert (east_neighbour.row, east_neighbour.col) == (cell.row, cell.col + 1)
    assert east_neighbour.bounds[0] == east
    assert north_neighbour.row == cell.row + 1
    assert north_neighbour.bounds[1] == north
    assert grid.cell_at(math.nextafter(west, -180), south).col == cell.col - 1
    assert grid.cell_at(west, math.nextafter(south, -90)).row == cell.row - 1


def test_rows_are_cell_size_high_and_columns_at_most_cell_size_wide(grid):
    metres_per_degree = 2 * math.pi * 6371008.8 / 360
    for lat in (0.0, -0.01, 30.0, -60.0, 80.0):
        cell = grid.cell_at(1.0, lat)
        west, south, east, north = cell.bounds
        assert (north - south) * metres_per_degree == pytest.approx(2560.0)
        near = min(abs(south), abs(north))
        width_near = (east - west) * metres_per_degree * math.cos(math.radians(near))
        assert 2560.0 * 0.99 < width_near <= 2560.0
        ncols = round(360 / (east - west))
        assert ncols % 2 == 0


def test_equator_rows_and_columns_are_named_from_zero(grid):
    assert grid.cell_at(0.0, 0.0).id == "R0000U_C0000R"
    assert grid.cell_at(-1e-9, -1e-9).id == "R0000D_C0000L"
    assert grid.cell_at(-1e-9, 1e-9).row == 0
    assert grid.cell_at(1e-9, -1e-9).row == -1


@pytest.mark.parametrize("lat", [0.5, 45.0, 60.0])
def test_cells_either_side_of_6e_use_their_own_utm_zone(grid, lat):
    east = grid.cell_at(6.0, lat)
    if (east.bounds[0] + east.bounds[2]) / 2 < 6.0:  # the cell holding 6°E is centred west of it
        east = grid.cell_at(east.bounds[2], lat)
    west = grid.cell_at(math.nextafter(east.bounds[0], -180), lat)
    hemisphere = 32600 if lat >= 0 else 32700
    assert (west.crs, east.crs) == (f"EPSG:{hemisphere + 31}", f"EPSG:{hemisphere + 32}")

    for cell in (west, east):
        coverage, offset = _coverage(cell)
        # The chip is a cell_size square aligned with the UTM grid, which at 3° from the central
        # meridian is rotated by the grid convergence (≈ Δlon·sin(lat)) against the lon/lat cell;
        # an equal square rotated by γ loses ≈ γ/2 of its area. The rest (pixel snapping, scale
        # factor, sphere vs ellipsoid) must stay under 1%.
        convergence = math.radians(3.0 * math.sin(math.radians(lat)))
        assert coverage >= 0.99 - convergence / 2
        assert offset < 2 * cell.pixel_size


def test_chip_raster_is_snapped_and_deterministic(grid):
    cell = grid.cell_at(6.0, 45.0)
    again = GlobalGrid(cell_size=2560, pixel_size=10).cell(cell.id)
    assert again == cell
    assert (again.x0, again.y0) == (cell.x0, cell.y0)
    assert cell.x0 % 10 == 0 and cell.y0 % 10 == 0
    assert cell.size == 256
    assert tuple(cell.transform)[:6] == (10.0, 0.0, cell.x0, 0.0, -10.0, cell.y0)

    box = cell.geobox()
    assert box.shape == (256, 256)
    assert box.crs == cell.crs
    assert box.affine == cell.transform
    coarse = cell.geobox(pixel_size=20)
    assert coarse.shape == (128, 128)
    assert coarse.extent.boundingbox == pytest.approx(box.extent.boundingbox)


def test_cell_ids_round_trip_and_are_path_safe(grid):
    rng = np.random.default_rng(42)
    lon = rng.uniform(-180, 180, 300)
    lat = rng.uniform(-90, 90, 300)
    for x, y in zip(lon, lat, strict=True):
        cell = grid.cell_at(x, y)
        assert re.fullmatch(r"R\d{4}[UD]_C\d{4}[RL]", cell.id)
        assert re.fullmatch(r"[A-Za-z0-9_]+", cell.id)
        assert grid.cell(cell.id) == cell
        west, south, east, north = cell.bounds
        assert grid.cell_at(west, south) == cell  # edges are half-open, even after float rounding
        if north < 90.0:
            assert grid.cell_at(west, north).row == cell.row + 1
        if south > -90.0:
            assert grid.cell_at(west, math.nextafter(south, -90.0)).row == cell.row - 1
        if west > -180.0:
            assert grid.cell_at(math.nextafter(west, -180.0), south).col == cell.col - 1
        assert grid.cell_at(east, south).col in (cell.col + 1, -cell.col - 1)  # east, or wraps at 180


def test_chip_id_round_trip():
    start, end = dt.date(2024, 1, 1), dt.date(2024, 1, 31)
    name = chip_id("R0433U_C1025R", start, end)
    assert name == "R0433U_C1025R_20240101-20240131"
    assert re.fullmatch(r"[A-Za-z0-9_-]+", name)
    assert parse_chip_id(name) == ("R0433U_C1025R", start, end)


def test_antimeridian_bbox_returns_cells_on_both_sides(grid):
    cells = grid.cells_in_bbox((179.9, -1.0, -179.9, 1.0))
    bounds = _bounds_array(cells)
    assert len({c.id for c in cells}) == len(cells)
    assert [c.id for c in cells] == sorted(c.id for c in cells)
    assert (bounds[:, 2] - bounds[:, 0] < 1.0).all()  # no cell spans the globe
    east_side = bounds[:, 0] >= 179.9 - 0.1
    west_side = bounds[:, 2] <= -179.9 + 0.1
    assert (east_side | west_side).all()
    assert east_side.sum() == west_side.sum() > 0
    assert bounds[east_side, 2].max() == 180.0
    assert bounds[west_side, 0].min() == -180.0
    assert {c.crs for c in cells} == {"EPSG:32601", "EPSG:32660", "EPSG:32701", "EPSG:32760"}


def test_antimeridian_points_and_footprints(grid):
    assert grid.cell_at(180.0, 10.0) == grid.cell_at(-180.0, 10.0)
    east = grid.cell_at(math.nextafter(180.0, 0), 10.0)
    assert east.bounds[2] == 180.0
    footprint = east.footprint
    assert footprint.is_valid
    assert footprint.bounds[2] > 180.0  # unwrapped past the antimeridian, not split across the globe
    assert footprint.bounds[2] - footprint.bounds[0] < 1.0


def test_antimeridian_geometry_as_multipolygon(grid):
    parts = shapely.MultiPolygon([shapely.box(179.95, 0.0, 180.0, 0.05), shapely.box(-180.0, 0.0, -179.95, 0.05)])
    cells = grid.cells_in_geometry(parts)
    assert cells == grid.cells_in_bbox((179.95, 0.0, -179.95, 0.05))


@pytest.mark.parametrize(("lat", "crs"), [(89.99, "EPSG:32661"), (-89.99, "EPSG:32761"), (90.0, "EPSG:32661")])
def test_polar_cells(grid, lat, crs):
    cell = grid.cell_at(123.0, lat)
    assert cell.crs == crs
    assert grid.cell(cell.id) == cell
    assert round(360 / (cell.bounds[2] - cell.bounds[0])) <= 8
    assert cell.polygon.covers(shapely.Point(123.0, lat))
    assert cell.footprint.is_valid
    assert cell.geobox().shape == (256, 256)


def test_pole_cap_cell_chip_covers_the_pole(grid):
    cap = grid.cell_at(10.0, 90.0)
    assert cap.bounds[3] == 90.0
    assert cap.bounds[2] - cap.bounds[0] == 180.0  # the cap row has two columns
    footprint = cap.footprint
    assert footprint.is_valid
    assert footprint.covers(cap.polygon)


@pytest.mark.parametrize("pole", [90.0, -90.0])
def test_bbox_around_a_pole(grid, pole):
    south, north = (89.9, 90.0) if pole > 0 else (-90.0, -89.9)
    cells = grid.cells_in_bbox((-180.0, south, 180.0, north))
    polygons = [c.polygon for c in cells]
    assert len({c.id for c in cells}) == len(cells)
    assert all(c.crs == ("EPSG:32661" if pole > 0 else "EPSG:32761") for c in cells)
    union = shapely.union_all(polygons)
    assert union.area == pytest.approx(sum(p.area for p in polygons), rel=1e-9)
    assert union.covers(shapely.box(-180.0, south, 180.0, north))
    assert union.bounds[0] == -180.0 and union.bounds[2] == 180.0
    row_height = 2560.0 / (2 * math.pi * 6371008.8 / 360)
    assert union.bounds[3] - union.bounds[1] < 0.1 + row_height
    assert len(cells) < 400  # few columns per row near the pole


def test_bbox_of_a_cell_returns_that_cell(grid):
    cell = grid.cell_at(-73.98, 40.75)
    assert grid.cells_in_bbox(cell.bounds) == [cell]
    assert grid.cells_in_geometry(cell.polygon) == [cell]
    west, south, _, _ = cell.bounds
    assert grid.cells_in_bbox((west, south, west, south)) == [cell]


def test_cells_in_geometry_keeps_only_intersecting_cells(grid):
    triangle = shapely.Polygon([(6.0, 45.0), (6.3, 45.0), (6.0, 45.3)])
    cells = grid.cells_in_geometry(triangle)
    candidates = grid.cells_in_bbox(triangle.bounds)
    assert 0 < len(cells) < len(candidates)
    assert all(c.polygon.intersects(triangle) for c in cells)
    dropped = {c.id for c in candidates} - {c.id for c in cells}
    assert all(not c.polygon.intersection(triangle).area for c in candidates if c.id in dropped)
    assert shapely.union_all([c.polygon for c in cells]).covers(triangle)
    cell = grid.cell_at(6.0, 45.0)
    east = grid.cell_at(cell.bounds[2], 45.0)
    north = grid.cell_at(6.0, cell.bounds[3])
    ell = shapely.union_all([cell.polygon, east.polygon, north.polygon])
    # Cells that only touch the L-shape along an edge or at a corner are left out.
    assert grid.cells_in_geometry(ell) == sorted([cell, east, north], key=lambda c: c.id)
    assert grid.cells_in_geometry(shapely.Point(6.0, 45.0)) == [grid.cell_at(6.0, 45.0)]
    assert grid.cells_in_geometry(shapely.Polygon()) == []


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"cell_size": 2560.0, "pixel_size": 7.0}, "cell_size"),
        ({"cell_size": 2560.0, "pixel_size": 0.0}, "pixel_size"),
        ({"cell_size": -1.0, "pixel_size": 10.0}, "cell_size"),
    ],
)
def test_bad_grid_parameters(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GlobalGrid(**kwargs)


@pytest.mark.parametrize(
    "cell_id",
    [
        "R0433U_C1025X",
        "r0433u_c1025r",
        "R433U_C1025R",
        "R00433U_C1025R",
        "R9999U_C0000R",
        "R0000U_C9999R",
        "",
    ],
)
def test_bad_cell_ids(grid, cell_id):
    with pytest.raises(ValueError, match=re.escape(repr(cell_id))):
        grid.cell(cell_id)


@pytest.mark.parametrize(
    "bbox",
    [
        (500000.0, 4000000.0, 510000.0, 4010000.0),  # UTM metres, not degrees
        (0.0, 0.0, 200.0, 1.0),
        (0.0, -91.0, 1.0, 0.0),
        (0.0, 1.0, 1.0, 0.0),  # south > north
        (0.0, 0.0, math.nan, 1.0),
    ],
)
def test_bad_bbox(grid, bbox):
    with pytest.raises(ValueError, match=r"bbox must be lon/lat degrees \(EPSG:4326\)") as err:
        grid.cells_in_bbox(bbox)
    assert repr(bbox) in str(err.value)


def test_bad_points_geometries_and_chip_ids(grid):
    with pytest.raises(ValueError, match="EPSG:4326"):
        grid.cell_at(500000.0, 4000000.0)
    with pytest.raises(ValueError, match="EPSG:4326"):
        grid.cells_in_geometry(shapely.box(500000.0, 4000000.0, 510000.0, 4010000.0))
    with pytest.raises(ValueError, match="pixel_size"):
        grid.cell_at(0.0, 0.0).geobox(pixel_size=60.0)
    for bad in ("R0433U_C1025R", "R0433U_C1025R_20241301-20241331", "R0433U_C1025R_2024-01-01"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            parse_chip_id(bad)
