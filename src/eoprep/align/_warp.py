"""Put any raster on a chip grid: by its geotransform, or by its ground control points when it has none.

Sentinel-1 GRD products carry no map projection, only a sparse GCP grid (slant geometry → lon/lat);
GDAL fits a polynomial to the GCPs and warps through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from eoprep.sources import ChipGrid

__all__ = ["warp_to_grid"]


def warp_to_grid(
    path: str | Path,
    grid: ChipGrid,
    *,
    bands: Sequence[int] = (1,),
    resampling: str = "bilinear",
    nodata: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Warp bands of a raster file onto a chip grid.

    Parameters
    ----------
    path
        Raster readable by rasterio, georeferenced by a geotransform or by GCPs only.
    grid
        The chip grid (`eoprep.sources.ChipGrid`).
    bands
        1-based band numbers.
    resampling
        A rasterio resampling name.
    nodata
        Source fill value; defaults to the file's, else 0.

    Returns
    -------
    data, valid
        ``(band, y, x)`` float32 data and the mask of pixels covered by valid source data.
    """
    import rasterio
    from affine import Affine
    from rasterio.enums import Resampling
    from rasterio.warp import reproject

    transform = Affine(grid.pixel_size, 0.0, grid.x0, 0.0, -grid.pixel_size, grid.y0)
    out = np.zeros((len(bands), grid.size, grid.size), np.float32)
    valid = np.zeros((len(bands), grid.size, grid.size), bool)
    with rasterio.open(path) as src:
        gcps, gcp_crs = src.gcps
        fill = nodata if nodata is not None else (src.nodata if src.nodata is not None else 0)
        if src.crs is None and not gcps:
            raise ValueError(f"{path}: has neither a CRS nor GCPs; it cannot be put on a map grid")
        geo = (
            {"gcps": gcps, "src_crs": gcp_crs}
            if src.crs is None
            else {"src_transform": src.transform, "src_crs": src.crs}
        )
        for i, band in enumerate(bands):
            source = src.read(band).astype(np.float32)
            mask = (source != fill).astype(np.uint8)
            reproject(
                source,
                out[i],
                src_nodata=fill,
                dst_nodata=np.nan,
                dst_transform=transform,
                dst_crs=grid.crs,
                resampling=Resampling[resampling],
                **geo,
            )
            cover = np.zeros((grid.size, grid.size), np.uint8)
            # A pixel is valid only if every source pixel under it is: `min` of the coverage mask.
            reproject(
                mask,
                cover,
                dst_transform=transform,
                dst_crs=grid.crs,
                resampling=Resampling.min,
                **geo,
            )
            valid[i] = (cover > 0) & np.isfinite(out[i])
    return out, valid
