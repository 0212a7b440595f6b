"""The embedded demo archive: realistic synthetic scenes of three sensors, as COGs with STAC items."""

from __future__ import annotations

from eoprep.demo._archive import (
    DEMO_BBOX,
    DEMO_DATETIME,
    LANDSAT_COLLECTION,
    S1_COLLECTION,
    S2_COLLECTION,
    SENSOR_SHIFTS,
    DemoArchive,
    generate_archive,
)

__all__ = [
    "DEMO_BBOX",
    "DEMO_DATETIME",
    "LANDSAT_COLLECTION",
    "S1_COLLECTION",
    "S2_COLLECTION",
    "SENSOR_SHIFTS",
    "DemoArchive",
    "generate_archive",
]
