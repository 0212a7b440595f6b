"""Sources: where items come from (STAC APIs) and how their pixels are read onto a chip grid."""

from __future__ import annotations

from eoprep.sources._earthengine import earthengine_cube, search_earthengine
from eoprep.sources._loaders import ChipGrid, is_nodata, read_items, warm_up_readers
from eoprep.sources._stac import aoi_geometry, search_items

__all__ = [
    "ChipGrid",
    "aoi_geometry",
    "earthengine_cube",
    "is_nodata",
    "read_items",
    "search_earthengine",
    "search_items",
    "warm_up_readers",
]
