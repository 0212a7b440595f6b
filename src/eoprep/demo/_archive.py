"""Write the embedded demo archive: Sentinel-2-, Sentinel-1- and Landsat-like COGs with STAC items.

The scenes follow the conventions of real providers (asset keys, dtypes, scale/offset in
``raster:bands``, nodata, SCL and QA_PIXEL classes, ``proj:code`` + per-asset shape/transform),
so the code paths that read them are the ones real archives take.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from pyproj import Transformer

from eoprep.demo._landscape import S2_BANDS, Landscape

__all__ = ["DEMO_BBOX", "DEMO_DATETIME", "DemoArchive", "SENSOR_SHIFTS", "generate_archive"]

#: Area of interest of the demo (lon/lat), in the Po valley, UTM zone 32N.
DEMO_BBOX = (9.000, 45.400, 9.070, 45.450)
DEMO_DATETIME = "2024-05-01/2024-07-31"
_CRS = "EPSG:32632"
_ALIGN = 60.0
#: Known misregistration of each sensor against the landscape (metres east, metres north).
SENSOR_SHIFTS = {"sentinel-2": (0.0, 0.0), "sentinel-1": (4.0, -3.0), "landsat": (7.5, -4.5)}
_S2_DATES = 8
_CLOUD_COVER = (0.0, 0.35, 0.05, 0.55, 0.0, 0.2, 0.8, 0.1)

S2_COLLECTION = "demo-sentinel-2-l2a"
S1_COLLECTION = "demo-sentinel-1-rtc"
LANDSAT_COLLECTION = "demo-landsat-c2-l2"

# SCL classes of Sentinel-2 L2A.
SCL_NODATA, SCL_SHADOW, SCL_VEGETATION, SCL_BARE, SCL_WATER, SCL_CLOUD_MEDIUM, SCL_CLOUD_HIGH = 0, 3, 4, 5, 6, 8, 9
# QA_PIXEL bits of Landsat Collection 2.
QA_FILL, QA_CLOUD, QA_SHADOW, QA_CLEAR, QA_WATER = 1 << 0, 1 << 3, 1 << 4, 1 << 6, 1 << 7


@dataclass
class DemoArchive:
    """What was generated: the STAC collections and items, ready to load into a catalog."""

    root: Path
    bbox: tuple[float, float, float, float]
    datetime: str
    collections: list[dict[str, Any]] = field(default_factory=list)
    items: list[dict[str, Any]] = field(default_factory=list)

    def write_json(self) -> Path:
        """Store collections and items as an ItemCollection file beside the COGs (a static copy)."""
        path = self.root / "catalog.json"
        path.write_text(json.dumps({"collections": self.collections, "items": self.items}))
        return path


@dataclass(frozen=True)
class _Grid:
    x0: float
    y0: float
    res: float
    width: int
    height: int

    @property
    def transform(self) -> Affine:
        return Affine(self.res, 0.0, self.x0, 0.0, -self.res, self.y0)

    def centres(self, shift: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
        x = self.x0 + (np.arange(self.width) + 0.5) * self.res - shift[0]
        y = self.y0 - (np.arange(self.height) + 0.5) * self.res - shift[1]
        return x[None, :], y[:, None]


def _write_cog(path: Path, data: np.ndarray, grid: _Grid, nodata: float | None) -> None:
    profile = {
        "driver": "COG",
        "width": grid.width,
        "height": grid.height,
        "count": 1,
        "dtype": data.dtype.name,
        "crs": _CRS,
        "transform": grid.transform,
        "nodata": nodata,
        "compress": "deflate",
        "blocksize": 256,
        "overview_resampling": "nearest",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)


def _asset(path: Path, grid: _Grid, title: str, raster: dict[str, Any], roles: list[str]) -> dict[str, Any]:
    return {
        "href": path.resolve().as_uri(),
        "type": "image/tiff; application=geotiff; profile=cloud-optimized",
        "title": title,
        "roles": roles,
        "proj:shape": [grid.height, grid.width],
        "proj:transform": list(grid.transform)[:6],
        "raster:bands": [raster],
    }


def _item(
    item_id: str, collection: str, when: dt.datetime, grid: _Grid, props: dict[str, Any], assets: dict[str, Any]
) -> dict[str, Any]:
    to_lonlat = Transformer.from_crs(_CRS, "EPSG:4326", always_xy=True)
    x1, y1 = grid.x0 + grid.width * grid.res, grid.y0 - grid.height * grid.res
    ring = [to_lonlat.transform(x, y) for x, y in [(grid.x0, y1), (x1, y1), (x1, grid.y0), (grid.x0, grid.y0)]]
    ring.append(ring[0])
    lons, lats = zip(*ring, strict=True)
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "stac_extensions": [
            "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
            "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
            "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
        ],
        "id": item_id,
        "collection": collection,
        "geometry": {"type": "Polygon", "coordinates": [[list(p) for p in ring]]},
        "bbox": [min(lons), min(lats), max(lons), max(lats)],
        "properties": {
            "datetime": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "proj:code": _CRS,
            "created": "2024-08-01T00:00:00Z",
            "updated": "2024-08-01T00:00:00Z",
            **props,
        },
        "links": [],
        "assets": assets,
    }


def _collection(cid: str, title: str, bbox: list[float], interval: list[str], item_assets: dict[str, Any]) -> dict:
    return {
        "type": "Collection",
        "stac_version": "1.1.0",
        "stac_extensions": ["https://stac-extensions.github.io/item-assets/v1.0.0/schema.json"],
        "id": cid,
        "title": title,
        "description": f"{title}: synthetic scenes generated by `eoprep demo` for tests and examples.",
        "license": "CC0-1.0",
        "extent": {"spatial": {"bbox": [bbox]}, "temporal": {"interval": [interval]}},
        "item_assets": item_assets,
        "links": [],
    }


def _scene_grid(bbox: tuple[float, float, float, float], res: float, margin: float) -> _Grid:
    to_utm = Transformer.from_crs("EPSG:4326", _CRS, always_xy=True)
    xs, ys = to_utm.transform([bbox[0], bbox[2], bbox[0], bbox[2]], [bbox[1], bbox[1], bbox[3], bbox[3]])
    x0 = np.floor((min(xs) - margin) / _ALIGN) * _ALIGN
    y1 = np.floor((min(ys) - margin) / _ALIGN) * _ALIGN
    x1 = np.ceil((max(xs) + margin) / _ALIGN) * _ALIGN
    y0 = np.ceil((max(ys) + margin) / _ALIGN) * _ALIGN
    return _Grid(x0=x0, y0=y0, res=res, width=int(round((x1 - x0) / res)), height=int(round((y0 - y1) / res)))


def generate_archive(
    root: Path,
    *,
    bbox: tuple[float, float, float, float] = DEMO_BBOX,
    seed: int = 0,
    margin: float = 3000.0,
    progress: Callable[[str], None] | None = None,
) -> DemoArchive:
    """Generate the demo archive under ``root`` (COGs + STAC JSON); deterministic for a given seed.

    Sentinel-2 L2A-like: 8 dates, B02 B03 B04 B08 at 10 m, B11 B12 and SCL at 20 m, uint16 with
    scale 1e-4 / offset -0.1, nodata 0, clouds and shadows marked in SCL, one date clipped by the
    swath edge. Sentinel-1 RTC-like: VV/VH float32 linear gamma0 at 10 m, NaN nodata. Landsat C2
    L2-like: 30 m, scale 2.75e-5 / offset -0.2, QA_PIXEL. Each sensor is misregistered against
    the landscape by ``SENSOR_SHIFTS`` (sub-pixel).
    """
    say = progress or (lambda _msg: None)
    root.mkdir(parents=True, exist_ok=True)
    g10 = _scene_grid(bbox, 10.0, margin)
    land = Landscape(
        x_min=g10.x0, y_min=g10.y0 - g10.height * 10.0, extent=max(g10.width, g10.height) * 10.0, seed=seed
    )
    archive = DemoArchive(root=root, bbox=bbox, datetime=DEMO_DATETIME)
    start = dt.datetime(2024, 5, 3, 10, 20, tzinfo=dt.UTC)
    say("sentinel-2: 8 dates")
    archive.items += _sentinel2(root / "sentinel-2", land, g10, start, seed)
    say("sentinel-1: 7 dates")
    archive.items += _sentinel1(root / "sentinel-1", land, g10, start + dt.timedelta(days=2, hours=7), seed)
    say("landsat: 5 dates")
    g30 = _Grid(g10.x0, g10.y0, 30.0, g10.width // 3, g10.height // 3)
    archive.items += _landsat(root / "landsat", land, g30, start + dt.timedelta(days=5, minutes=15), seed)
    interval = ["2024-05-01T00:00:00Z", "2024-07-31T23:59:59Z"]
    lon_lat = [float(v) for v in archive.items[0]["bbox"]]
    archive.collections = [
        _collection(
            S2_COLLECTION, "Demo Sentinel-2 L2A", lon_lat, interval, _item_assets(archive.items, S2_COLLECTION)
        ),
        _collection(
            S1_COLLECTION, "Demo Sentinel-1 RTC", lon_lat, interval, _item_assets(archive.items, S1_COLLECTION)
        ),
        _collection(
            LANDSAT_COLLECTION, "Demo Landsat C2 L2", lon_lat, interval, _item_assets(archive.items, LANDSAT_COLLECTION)
        ),
    ]
    archive.write_json()
    return archive


def _item_assets(items: list[dict[str, Any]], collection: str) -> dict[str, Any]:
    first = next(i for i in items if i["collection"] == collection)
    keep = ("type", "title", "roles", "raster:bands")
    return {k: {f: v[f] for f in keep} for k, v in first["assets"].items()}


def _sentinel2(folder: Path, land: Landscape, g10: _Grid, start: dt.datetime, seed: int) -> list[dict]:
    g20 = _Grid(g10.x0, g10.y0, 20.0, g10.width // 2, g10.height // 2)
    shift = SENSOR_SHIFTS["sentinel-2"]
    sites = {10: land.site(*g10.centres(shift)), 20: land.site(*g20.centres(shift))}
    items = []
    for i in range(_S2_DATES):
        when = start + dt.timedelta(days=10 * i)
        doy = when.timetuple().tm_yday
        item_id = f"S2X_32TMR_{when:%Y%m%d}_0_L2A"
        out = folder / item_id
        out.mkdir(parents=True, exist_ok=True)
        cover = _CLOUD_COVER[i % len(_CLOUD_COVER)]
        assets, scl_frac = {}, 0.0
        for res, grid, names in ((10, g10, S2_BANDS[:4]), (20, g20, S2_BANDS[4:])):
            x, y = grid.centres(shift)
            refl = land.reflectance(sites[res], doy)
            cloud = land.clouds(x, y, seed * 1000 + i, cover)
            shadow = land.clouds(x + 400.0, y - 300.0, seed * 1000 + i, cover) * (1 - cloud)
            valid = _swath_mask(x, y, land) if i == 2 else np.ones(cloud.shape, bool)
            for name in names:
                band = refl[S2_BANDS.index(name)]
                band = band * (1 - 0.6 * shadow) * (1 - cloud) + 0.55 * cloud
                dn = np.clip(np.round((band + 0.1) * 10000), 1, 65535).astype(np.uint16)
                dn[~valid] = 0
                _write_cog(out / f"{name}.tif", dn, grid, 0)
                assets[name] = _asset(out / f"{name}.tif", grid, name, _s2_raster(res), ["data", "reflectance"])
            if res == 20:
                scl = _scl(sites[20].cls, cloud, shadow, valid)
                scl_frac = float(np.isin(scl, (SCL_CLOUD_MEDIUM, SCL_CLOUD_HIGH)).mean())
                _write_cog(out / "SCL.tif", scl, grid, 0)
                raster = {"nodata": 0, "data_type": "uint8", "spatial_resolution": 20}
                assets["SCL"] = _asset(out / "SCL.tif", grid, "Scene classification map", raster, ["data"])
        props = {
            "platform": "sentinel-2x",
            "constellation": "sentinel-2",
            "eo:cloud_cover": round(100 * scl_frac, 2),
            "s2:mgrs_tile": "32TMR",
            "eoprep:true_shift": list(shift),
        }
        items.append(_item(item_id, S2_COLLECTION, when, g10, props, assets))
    return items


def _s2_raster(res: int) -> dict[str, Any]:
    return {"nodata": 0, "data_type": "uint16", "scale": 0.0001, "offset": -0.1, "spatial_resolution": res}


def _swath_mask(x: np.ndarray, y: np.ndarray, land: Landscape) -> np.ndarray:
    """The edge of an orbit swath: a diagonal line beyond which the scene has no data."""
    u = (x - land.x_min) / land.extent + (y - land.y_min) / land.extent * 0.4
    return np.broadcast_to(u < 0.95, np.broadcast_shapes(x.shape, y.shape)).copy()


def _scl(cls: np.ndarray, cloud: np.ndarray, shadow: np.ndarray, valid: np.ndarray) -> np.ndarray:
    scl = np.array([SCL_VEGETATION, SCL_VEGETATION, SCL_WATER, SCL_BARE, SCL_BARE], np.uint8)[cls]
    scl[shadow > 0.3] = SCL_SHADOW
    scl[cloud > 0.2] = SCL_CLOUD_MEDIUM
    scl[cloud > 0.7] = SCL_CLOUD_HIGH
    scl[~valid] = SCL_NODATA
    return scl


def _sentinel1(folder: Path, land: Landscape, g10: _Grid, start: dt.datetime, seed: int) -> list[dict]:
    shift = SENSOR_SHIFTS["sentinel-1"]
    site = land.site(*g10.centres(shift))
    rng = np.random.default_rng(seed + 1)
    items = []
    for i in range(7):
        when = start + dt.timedelta(days=12 * i)
        item_id = f"S1X_IW_GRDH_1SDV_{when:%Y%m%dT%H%M%S}_rtc"
        out = folder / item_id
        out.mkdir(parents=True, exist_ok=True)
        gamma0 = land.backscatter(site, when.timetuple().tm_yday)
        assets = {}
        for k, pol in enumerate(("vv", "vh")):
            speckled = (gamma0[k] * rng.gamma(4.0, 1 / 4.0, size=gamma0[k].shape)).astype(np.float32)
            _write_cog(out / f"{pol}.tif", speckled, g10, float("nan"))
            raster = {"nodata": "nan", "data_type": "float32", "unit": "linear gamma0", "spatial_resolution": 10}
            assets[pol] = _asset(
                out / f"{pol}.tif", g10, f"{pol.upper()} gamma0 (RTC)", raster, ["data", "backscatter"]
            )
        props = {
            "platform": "sentinel-1x",
            "constellation": "sentinel-1",
            "sar:instrument_mode": "IW",
            "sar:polarizations": ["VV", "VH"],
            "sat:orbit_state": "ascending",
            "eoprep:true_shift": list(shift),
        }
        items.append(_item(item_id, S1_COLLECTION, when, g10, props, assets))
    return items


_LANDSAT_BANDS = ("blue", "green", "red", "nir08", "swir16", "swir22")


def _landsat(folder: Path, land: Landscape, g30: _Grid, start: dt.datetime, seed: int) -> list[dict]:
    shift = SENSOR_SHIFTS["landsat"]
    x, y = g30.centres(shift)
    site = land.site(x, y)
    items = []
    for i in range(5):
        when = start + dt.timedelta(days=16 * i)
        item_id = f"LX09_L2SP_193028_{when:%Y%m%d}_02_T1"
        out = folder / item_id
        out.mkdir(parents=True, exist_ok=True)
        refl = land.reflectance(site, when.timetuple().tm_yday)
        cover = _CLOUD_COVER[(2 * i + 1) % len(_CLOUD_COVER)]
        cloud = land.clouds(x, y, seed * 1000 + 500 + i, cover)
        shadow = land.clouds(x + 400.0, y - 300.0, seed * 1000 + 500 + i, cover) * (1 - cloud)
        assets = {}
        for k, name in enumerate(_LANDSAT_BANDS):
            band = refl[k] * (1 - 0.6 * shadow) * (1 - cloud) + 0.55 * cloud
            dn = np.clip(np.round((band + 0.2) / 2.75e-5), 1, 65535).astype(np.uint16)
            _write_cog(out / f"{name}.tif", dn, g30, 0)
            raster = {"nodata": 0, "data_type": "uint16", "scale": 2.75e-5, "offset": -0.2, "spatial_resolution": 30}
            assets[name] = _asset(out / f"{name}.tif", g30, name, raster, ["data", "reflectance"])
        qa = np.full(cloud.shape, QA_CLEAR, np.uint16)
        qa[site.cls == 2] |= QA_WATER
        qa[shadow > 0.3] = QA_SHADOW
        qa[cloud > 0.2] = QA_CLOUD
        _write_cog(out / "qa_pixel.tif", qa, g30, QA_FILL)
        raster = {"nodata": QA_FILL, "data_type": "uint16", "spatial_resolution": 30}
        assets["qa_pixel"] = _asset(out / "qa_pixel.tif", g30, "Pixel quality", raster, ["cloud", "cloud-shadow"])
        props = {
            "platform": "landsat-9x",
            "constellation": "landsat",
            "eo:cloud_cover": round(100 * float((cloud > 0.2).mean()), 2),
            "landsat:wrs_path": "193",
            "landsat:wrs_row": "028",
            "eoprep:true_shift": list(shift),
        }
        items.append(_item(item_id, LANDSAT_COLLECTION, when, g30, props, assets))
    return items
