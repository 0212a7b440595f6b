"""A fixed global grid of near-square cells, each with a chip raster in its own UTM/UPS zone.

Cells are defined in lon/lat so that they tile the globe with no gaps, overlaps or partial cells;
each cell's chip raster is a pixel-snapped square in the projected CRS of the cell centre, so that
every sensor can be reprojected onto the same metre grid. Ids depend only on the cell's indices,
which makes them stable across runs and safe to use as file or Zarr path parts.
"""

from __future__ import annotations

import datetime as dt
import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
import shapely
from affine import Affine
from odc.geo.geobox import GeoBox
from pyproj import Transformer

__all__ = ["EARTH_RADIUS", "Cell", "GlobalGrid", "chip_id", "parse_chip_id"]

EARTH_RADIUS = 6371008.8
"""Mean Earth radius (metres) of the sphere that sets row heights and column counts."""

_METRES_PER_DEGREE = 2 * math.pi * EARTH_RADIUS / 360
_CELL_ID = re.compile(r"R(\d{4,})([UD])_C(\d{4,})([RL])")
_CHIP_ID = re.compile(r"(?P<cell>.+)_(?P<start>\d{8})-(?P<end>\d{8})")
_FOOTPRINT_POINTS_PER_EDGE = 32


@dataclass(frozen=True)
class Cell:
    """One grid cell and the square chip raster that covers it.

    Attributes
    ----------
    id : str
        Stable id such as ``"R0433U_C1025R"``; only ``[A-Za-z0-9_]``, so it is safe as a path part.
    row, col : int
        Signed indices: ``row < 0`` is south of the equator, ``col < 0`` is west of Greenwich.
    bounds : tuple of float
        Lon/lat bounds of the cell ``(west, south, east, north)`` in degrees.
    crs : str
        ``"EPSG:326zz"``/``"EPSG:327zz"`` (UTM zone of the cell centre), or ``"EPSG:32661"``/
        ``"EPSG:32761"`` (UPS) when the centre is north of 84° or south of -80°.
    x0, y0 : float
        Upper-left corner of the chip raster in ``crs`` (metres), multiples of ``pixel_size``.
    size : int
        Chip width and height in pixels (``cell_size / pixel_size``).
    pixel_size : float
        Chip pixel size in metres.
    """

    id: str
    row: int
    col: int
    bounds: tuple[float, float, float, float]
    crs: str
    x0: float
    y0: float
    size: int
    pixel_size: float

    @property
    def transform(self) -> Affine:
        """Affine transform of the chip raster (north up)."""
        return Affine(self.pixel_size, 0.0, self.x0, 0.0, -self.pixel_size, self.y0)

    @property
    def polygon(self) -> shapely.Polygon:
        """Lon/lat polygon of the cell; cells of the grid tile the globe exactly."""
        return shapely.box(*self.bounds)

    @property
    def footprint(self) -> shapely.Polygon:
        """Lon/lat polygon of the chip raster square, with densified edges.

        Longitudes are unwrapped around the cell centre, so near the antimeridian they may pass
        ±180 instead of splitting the polygon; a chip that contains a pole is closed through it.
        """
        extent = self.size * self.pixel_size
        t = np.linspace(0.0, 1.0, _FOOTPRINT_POINTS_PER_EDGE, endpoint=False)
        xs = self.x0 + extent * np.concatenate([t, np.ones_like(t), 1 - t, np.zeros_like(t)])
        ys = self.y0 - extent * np.concatenate([np.zeros_like(t), t, np.ones_like(t), 1 - t])
        lon, lat = _from_crs(self.crs).transform(xs, ys)
        centre_lon = (self.bounds[0] + self.bounds[2]) / 2
        lon = centre_lon + (np.asarray(lon) - centre_lon + 180.0) % 360.0 - 180.0
        lon = np.unwrap(np.append(lon, lon[0]), period=360.0)
        ring = list(zip(lon[:-1], lat, strict=True))
        if abs(lon[-1] - lon[0]) > 180.0:
            # The ring circles a pole: close it along the pole so the polygon covers the cap.
            pole = 90.0 if self.bounds[3] > 0 else -90.0
            ring += [(lon[-1], lat[0]), (lon[-1], pole), (lon[0], pole)]
        return shapely.Polygon(ring)

    def geobox(self, pixel_size: float | None = None) -> GeoBox:
        """Chip raster grid, optionally at another resolution with the same extent.

        Parameters
        ----------
        pixel_size : float, optional
            Pixel size in metres; the cell size must be an integer multiple of it.
            Defaults to the grid's pixel size.

        Returns
        -------
        odc.geo.geobox.GeoBox
            Square grid in ``self.crs`` with its upper-left corner at ``(x0, y0)``.
        """
        if pixel_size is None:
            return GeoBox((self.size, self.size), self.transform, self.crs)
        extent = self.size * self.pixel_size
        size = _whole_multiple(extent, pixel_size)
        if size is None:
            raise ValueError(
                f"pixel_size must divide the chip extent of cell {self.id} ({extent} m) a whole number "
                f"of times, got {pixel_size!r}"
            )
        transform = Affine(pixel_size, 0.0, self.x0, 0.0, -pixel_size, self.y0)
        return GeoBox((size, size), transform, self.crs)


@dataclass(frozen=True)
class GlobalGrid:
    """A fixed global grid of cells about ``cell_size`` metres on a side.

    Rows are bands of equal latitude height (``cell_size`` metres on a sphere of radius
    `EARTH_RADIUS`); rows touching a pole are clipped at ±90°. Each row is split into an even
    number of equal columns, as many as needed so that no column is wider than ``cell_size`` at
    the row edge nearest the equator; columns therefore meet exactly at 0° and ±180°. Points on a
    shared edge belong to the cell to the north/east; lat 90 belongs to the last row and lon 180
    is lon -180.

    Parameters
    ----------
    cell_size : float
        Cell height (and maximum width) in metres, e.g. ``2560.0``.
    pixel_size : float
        Chip pixel size in metres, e.g. ``10.0``; ``cell_size`` must be an integer multiple of it.
    """

    cell_size: float
    pixel_size: float

    def __post_init__(self) -> None:
        for name in ("cell_size", "pixel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
                raise ValueError(f"GlobalGrid {name} must be a positive number of metres, got {value!r}")
        if _whole_multiple(self.cell_size, self.pixel_size) is None:
            raise ValueError(
                f"GlobalGrid cell_size ({self.cell_size}) must be an integer multiple of "
                f"pixel_size ({self.pixel_size}), so that a chip is a whole number of pixels"
            )

    @property
    def size(self) -> int:
        """Chip width and height in pixels."""
        return round(self.cell_size / self.pixel_size)

    @property
    def _dlat(self) -> float:
        return self.cell_size / _METRES_PER_DEGREE

    @property
    def _nrows(self) -> int:
        """Rows per hemisphere."""
        nrows = math.ceil(90.0 / self._dlat)
        return nrows - 1 if (nrows - 1) * self._dlat >= 90.0 else nrows

    def cell_at(self, lon: float, lat: float) -> Cell:
        """The cell containing a lon/lat point.

        Parameters
        ----------
        lon, lat : float
            Point in degrees (EPSG:4326), lon in [-180, 180], lat in [-90, 90].

        Returns
        -------
        Cell
        """
        if not (math.isfinite(lon) and math.isfinite(lat) and -180 <= lon <= 180 and -90 <= lat <= 90):
            raise ValueError(
                f"point (lon={lon!r}, lat={lat!r}) must be lon/lat degrees (EPSG:4326): "
                "lon in [-180, 180], lat in [-90, 90]"
            )
        if lon == 180.0:
            lon = -180.0
        row = self._row_of(lat)
        return self._cell(row, self._col_of(row, lon))

    def cell(self, cell_id: str) -> Cell:
        """The cell with a given id.

        Parameters
        ----------
        cell_id : str
            Id as produced by this grid, e.g. ``"R0433U_C1025R"``.

        Returns
        -------
        Cell

        Raises
        ------
        ValueError
            If the id is malformed or names a row or column outside this grid.
        """
        match = _CELL_ID.fullmatch(cell_id) if isinstance(cell_id, str) else None
        if match is None:
            raise ValueError(
                f"malformed cell id {cell_id!r}: expected 'R<row:04d>U|D_C<col:04d>R|L', e.g. 'R0433U_C1025R'"
            )
        n, ns, m, ew = match.groups()
        row = int(n) if ns == "U" else -int(n) - 1
        col = int(m) if ew == "R" else -int(m) - 1
        if _format_id(row, col) != cell_id:
            raise ValueError(f"malformed cell id {cell_id!r}: expected {_format_id(row, col)!r}")
        if not -self._nrows <= row < self._nrows:
            raise ValueError(
                f"cell id {cell_id!r} is outside this grid (cell_size={self.cell_size}): "
                f"rows run from R{self._nrows - 1:04d}D to R{self._nrows - 1:04d}U"
            )
        half = self._ncols(row) // 2
        if not -half <= col < half:
            raise ValueError(
                f"cell id {cell_id!r} is outside this grid (cell_size={self.cell_size}): "
                f"its row has {2 * half} columns, C{half - 1:04d}L to C{half - 1:04d}R"
            )
        return self._cell(row, col)

    def cells_in_bbox(self, bbox: tuple[float, float, float, float]) -> list[Cell]:
        """Cells that overlap a lon/lat bounding box.

        A cell counts if it shares area with the box; an edge of the box lying exactly on a cell
        edge does not pull in the neighbouring cell. A box of zero width or height returns the
        cells that contain its points.

        Parameters
        ----------
        bbox : tuple of float
            ``(west, south, east, north)`` in degrees (EPSG:4326); ``west > east`` means the box
            crosses the antimeridian.

        Returns
        -------
        list of Cell
            Sorted by id, without duplicates.
        """
        try:
            west, south, east, north = (float(v) for v in bbox)
        except (TypeError, ValueError):
            west = south = east = north = math.nan
        if not (-180 <= west <= 180 and -180 <= east <= 180 and -90 <= south <= north <= 90):
            raise ValueError(
                f"bbox must be lon/lat degrees (EPSG:4326) as (west, south, east, north) with "
                f"lon in [-180, 180], lat in [-90, 90] and south <= north, got {bbox!r}"
            )
        if west > east and west == 180.0:
            west = -180.0
        if west > east and east == -180.0:
            east = 180.0
        spans = [(west, east)] if west <= east else [(west, 180.0), (-180.0, east)]
        cells: dict[str, Cell] = {}
        for r in _span(south, north, self._row_of, self._lat_edge):
            ncols = self._ncols(r)
            for lo, hi in spans:
                cols = _span(lo, hi, lambda lon, r=r: self._col_of(r, lon), lambda c, n=ncols: c * 360 / n)
                for c in cols:
                    cell = self._cell(r, c)
                    cells[cell.id] = cell
        return [cells[k] for k in sorted(cells)]

    def cells_in_geometry(self, geom: shapely.Geometry) -> list[Cell]:
        """Cells that intersect a lon/lat geometry.

        For polygons a cell counts if it shares area with the geometry (touching along an edge is
        not enough); for points and lines a cell counts if it touches them.

        Parameters
        ----------
        geom : shapely.Geometry
            Geometry in degrees (EPSG:4326). Split geometries that cross the antimeridian into
            parts on either side (e.g. a MultiPolygon).

        Returns
        -------
        list of Cell
            Sorted by id, without duplicates.
        """
        if geom.is_empty:
            return []
        west, south, east, north = geom.bounds
        if not (-180 <= west <= east <= 180 and -90 <= south <= north <= 90):
            raise ValueError(
                "geometry must be lon/lat degrees (EPSG:4326) with lon in [-180, 180] and lat in "
                f"[-90, 90], got one with bounds {geom.bounds!r}"
            )
        cells: dict[str, Cell] = {}
        # Twice, because a GeometryCollection may hold multi-part geometries.
        for part in shapely.get_parts(shapely.get_parts(geom)):
            if part.is_empty:
                continue
            candidates = self.cells_in_bbox(shapely.bounds(part).tolist())
            polygons = shapely.box(*np.array([c.bounds for c in candidates]).T)
            shapely.prepare(part)
            hits = shapely.intersects(part, polygons)
            if shapely.get_dimensions(part) == 2:
                hits &= ~shapely.touches(part, polygons)
            for cell, hit in zip(candidates, hits, strict=True):
                if hit:
                    cells[cell.id] = cell
        return [cells[k] for k in sorted(cells)]

    def _lat_edge(self, k: int) -> float:
        return min(90.0, max(-90.0, k * self._dlat))

    def _ncols(self, row: int) -> int:
        lat_near = self._lat_edge(row if row >= 0 else row + 1)
        circumference = 2 * math.pi * EARTH_RADIUS * math.cos(math.radians(lat_near))
        ncols = max(2, math.ceil(circumference / self.cell_size))
        return ncols + ncols % 2

    def _row_of(self, lat: float) -> int:
        return _index_of(lat, math.floor(lat / self._dlat), self._lat_edge, -self._nrows, self._nrows - 1)

    def _col_of(self, row: int, lon: float) -> int:
        ncols = self._ncols(row)
        guess = math.floor(lon * ncols / 360)
        return _index_of(lon, guess, lambda c: c * 360 / ncols, -ncols // 2, ncols // 2 - 1)

    def _cell(self, row: int, col: int) -> Cell:
        ncols = self._ncols(row)
        west, east = col * 360 / ncols, (col + 1) * 360 / ncols
        south, north = self._lat_edge(row), self._lat_edge(row + 1)
        lon_c, lat_c = (west + east) / 2, (south + north) / 2
        crs = _crs_of(lon_c, lat_c)
        x, y = _to_crs(crs).transform(lon_c, lat_c)
        half = self.cell_size / 2
        x0 = math.floor((x - half) / self.pixel_size) * self.pixel_size
        y0 = math.floor((y + half) / self.pixel_size) * self.pixel_size
        return Cell(
            id=_format_id(row, col),
            row=row,
            col=col,
            bounds=(west, south, east, north),
            crs=crs,
            x0=float(x0),
            y0=float(y0),
            size=self.size,
            pixel_size=float(self.pixel_size),
        )


def chip_id(cell_id: str, start: dt.date, end: dt.date) -> str:
    """Id of a chip: one cell over one time window.

    Parameters
    ----------
    cell_id : str
        Id of the grid cell.
    start, end : datetime.date
        First and last day of the time window.

    Returns
    -------
    str
        ``"{cell_id}_{start:%Y%m%d}-{end:%Y%m%d}"``, e.g. ``"R0433U_C1025R_20240101-20240131"``.
    """
    return f"{cell_id}_{start:%Y%m%d}-{end:%Y%m%d}"


def parse_chip_id(chip_id: str) -> tuple[str, dt.date, dt.date]:
    """Split a chip id into its cell id and time window.

    Parameters
    ----------
    chip_id : str
        Id as produced by `chip_id`.

    Returns
    -------
    tuple of (str, datetime.date, datetime.date)
        Cell id, start date and end date.

    Raises
    ------
    ValueError
        If the id does not have the form ``{cell_id}_{YYYYMMDD}-{YYYYMMDD}``.
    """
    match = _CHIP_ID.fullmatch(chip_id) if isinstance(chip_id, str) else None
    try:
        if match is None:
            raise ValueError("no _YYYYMMDD-YYYYMMDD suffix")
        start = dt.datetime.strptime(match["start"], "%Y%m%d").date()
        end = dt.datetime.strptime(match["end"], "%Y%m%d").date()
    except ValueError as err:
        raise ValueError(
            f"malformed chip id {chip_id!r}: expected '{{cell_id}}_{{YYYYMMDD}}-{{YYYYMMDD}}', "
            f"e.g. 'R0433U_C1025R_20240101-20240131' ({err})"
        ) from None
    return match["cell"], start, end


def _format_id(row: int, col: int) -> str:
    ns, n = ("U", row) if row >= 0 else ("D", -row - 1)
    ew, m = ("R", col) if col >= 0 else ("L", -col - 1)
    return f"R{n:04d}{ns}_C{m:04d}{ew}"


def _index_of(value: float, guess: int, edge: Callable[[int], float], first: int, last: int) -> int:
    """Index i in [first, last] with edge(i) <= value < edge(i + 1), fixing float rounding in guess."""
    i = min(max(guess, first), last)
    while i > first and value < edge(i):
        i -= 1
    while i < last and value >= edge(i + 1):
        i += 1
    return i


def _span(lo: float, hi: float, index_of: Callable[[float], int], edge: Callable[[int], float]) -> range:
    """Indices of the intervals that share length with [lo, hi], or that contain lo if lo == hi."""
    first, last = index_of(lo), index_of(hi)
    if hi > lo and last > first and edge(last) >= hi:
        last -= 1
    return range(first, last + 1)


def _whole_multiple(extent: float, step: float) -> int | None:
    """How many times `step` fits in `extent`, or None unless that is a whole positive number."""
    if not (math.isfinite(step) and step > 0):
        return None
    ratio = extent / step
    return round(ratio) if ratio >= 1 and abs(ratio - round(ratio)) <= 1e-9 * ratio else None


def _crs_of(lon: float, lat: float) -> str:
    """Projected CRS of a cell centre: its UTM zone, or UPS beyond UTM's latitude limits."""
    if lat > 84.0:
        return "EPSG:32661"
    if lat < -80.0:
        return "EPSG:32761"
    zone = min(int((lon + 180.0) // 6.0) + 1, 60)
    return f"EPSG:{(32600 if lat >= 0 else 32700) + zone}"


@cache
def _to_crs(crs: str) -> Transformer:
    return Transformer.from_crs("EPSG:4326", crs, always_xy=True)


@cache
def _from_crs(crs: str) -> Transformer:
    return Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
