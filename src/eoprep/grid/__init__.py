"""Fixed global grid: stable cell ids, a UTM/UPS chip raster per cell, and chip ids (cell × time window)."""

from __future__ import annotations

from eoprep.grid._grid import EARTH_RADIUS, Cell, GlobalGrid, chip_id, parse_chip_id

__all__ = ["EARTH_RADIUS", "Cell", "GlobalGrid", "chip_id", "parse_chip_id"]
