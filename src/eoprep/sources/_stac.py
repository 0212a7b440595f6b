"""STAC API source: the search that turns a spec's source section into items per collection."""

from __future__ import annotations

import json
from typing import Any

import pystac
import requests
import shapely
from pyproj import CRS, Transformer
from pystac_client import Client
from pystac_client.exceptions import APIError
from pystac_client.stac_api_io import StacApiIO
from shapely.errors import ShapelyError
from shapely.geometry import box, shape
from shapely.ops import transform as shapely_transform
from urllib3.util.retry import Retry

from eoprep.config import AoiSpec, SourceSpec
from eoprep.errors import EoprepError

__all__ = ["aoi_geometry", "search_items"]


def aoi_geometry(aoi: AoiSpec) -> shapely.Geometry:
    """The AOI as a lon/lat geometry, whatever CRS the spec gave it in."""
    if aoi.bbox is not None:
        geom, where = box(*aoi.bbox), "source.aoi.bbox"
    else:
        assert aoi.geojson is not None
        geom, where = _read_geojson(aoi), f"source.aoi.geojson ({aoi.geojson})"
    crs = _parse_crs(aoi.crs)
    if not crs.equals(CRS.from_epsg(4326), ignore_axis_order=True):
        to_lonlat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
        geom = shapely_transform(to_lonlat.transform, geom)
    west, south, east, north = geom.bounds
    if not (-180 <= west <= 180 and -180 <= east <= 180 and -90 <= south <= 90 and -90 <= north <= 90):
        raise EoprepError(
            f"{where}: coordinates {[round(v, 3) for v in geom.bounds]} are not lon/lat degrees; "
            f"give EPSG:4326 values or set source.aoi.crs to the CRS they are in"
        )
    if geom.is_empty or geom.area == 0:
        raise EoprepError(f"{where}: the area of interest is empty")
    return geom


def _parse_crs(text: str) -> CRS:
    try:
        return CRS.from_user_input(text)
    except Exception:
        raise EoprepError(f"source.aoi.crs: {text!r} is not a CRS (use e.g. EPSG:4326 or EPSG:32632)") from None


def _read_geojson(aoi: AoiSpec) -> shapely.Geometry:
    path = aoi.geojson
    assert path is not None
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise EoprepError(f"source.aoi.geojson: cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise EoprepError(f"source.aoi.geojson: {path} is not JSON ({exc.msg} at line {exc.lineno})") from None
    try:
        geoms = _geojson_geometries(doc)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ShapelyError) as exc:
        raise EoprepError(
            f"source.aoi.geojson: {path} is not a GeoJSON geometry, Feature or FeatureCollection "
            f"({type(exc).__name__}: {exc})"
        ) from None
    if not geoms:
        raise EoprepError(f"source.aoi.geojson: {path} holds no geometry")
    return shapely.union_all(geoms)


def _geojson_geometries(doc: Any) -> list[shapely.Geometry]:
    kind = doc.get("type")
    if kind == "FeatureCollection":
        return [shape(f["geometry"]) for f in doc.get("features", []) if f.get("geometry")]
    if kind == "Feature":
        return [shape(doc["geometry"])]
    return [shape(doc)]


def _stac_io(retries: int, timeout: float) -> StacApiIO:
    """HTTP for the API with retries: 429/5xx and timeouts back off exponentially (searches are POSTs too)."""
    retry = Retry(
        total=retries,
        connect=min(retries, 2),
        backoff_factor=0.5,
        status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=None,
        raise_on_status=False,
    )
    return StacApiIO(timeout=timeout, max_retries=retry)


def _open_client(url: str, sign: str | None, retries: int, timeout: float) -> Client:
    modifier = None
    if sign == "planetary-computer":
        try:
            import planetary_computer
        except ImportError:
            raise EoprepError("source.sign: 'planetary-computer' needs: pip install planetary-computer") from None
        modifier = planetary_computer.sign_inplace
    try:
        return _rooted(Client.open(url, modifier=modifier, stac_io=_stac_io(retries, timeout)))
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise EoprepError(f"source.url: cannot reach the STAC API at {url} ({type(exc).__name__})") from None
    except APIError as exc:
        if _unreachable(exc):
            raise EoprepError(f"source.url: cannot reach the STAC API at {url} ({_cause(exc)})") from None
        raise EoprepError(f"source.url: {url} answered with an error: {str(exc).splitlines()[0][:200]}") from None
    except (json.JSONDecodeError, pystac.STACError, KeyError) as exc:
        raise EoprepError(f"source.url: {url} is not a STAC API landing page ({exc})") from None


def _rooted(client: Client) -> Client:
    """The landing page as its own root, when its root link points to it.

    Unresolved, that link made pystac fetch the landing page a second time to resolve the search
    link's href: one more round trip to the API per run.
    """
    link, own = client.get_single_link("root"), client.get_self_href()
    if link is None or link.is_resolved() or not own:
        return client
    if (link.get_target_str() or "").rstrip("/") == own.rstrip("/"):  # the raw href: `.href` resolves the root
        client.set_root(client)
    return client


def _unreachable(exc: APIError) -> bool:
    """pystac-client wraps connection failures in APIError; the requests error is its context."""
    return isinstance(exc.__cause__ or exc.__context__, requests.ConnectionError | requests.Timeout)


def _cause(exc: BaseException) -> str:
    inner = exc.__cause__ or exc.__context__ or exc
    return type(inner).__name__


def search_items(
    source: SourceSpec, *, url: str | None = None, aoi: shapely.Geometry | None = None
) -> dict[str, list[pystac.Item]]:
    """Run the spec's search once per collection; every band must be an asset of the items found.

    Parameters
    ----------
    source
        The validated source section of a pipeline spec.
    url
        The API root to use instead of ``source.url`` (the embedded catalog's address).
    aoi
        The AOI in lon/lat, if already computed.
    """
    api = url or source.url
    geom = aoi if aoi is not None else aoi_geometry(source.aoi)
    client = _open_client(api, source.sign, source.retries, source.timeout)
    start, end = source.time_range
    found: dict[str, list[pystac.Item]] = {}
    for i, coll in enumerate(source.collections):
        kwargs: dict[str, Any] = {
            "collections": [coll.id],
            "intersects": shapely.geometry.mapping(geom),
            "datetime": [start.to_pydatetime(), end.to_pydatetime()],
            "max_items": source.max_items,
            "limit": 250,
        }
        if source.query:
            kwargs["query"] = source.query
        if source.filter:
            kwargs["filter"] = source.filter
            kwargs["filter_lang"] = source.filter_lang
        try:
            items = list(client.search(**kwargs).items())
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise EoprepError(f"source.url: lost the STAC API at {api} during search ({type(exc).__name__})") from None
        except APIError as exc:
            if _unreachable(exc):
                raise EoprepError(f"source.url: lost the STAC API at {api} during search ({_cause(exc)})") from None
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise EoprepError(f"source.collections[{i}] ({coll.id}): search failed at {api}: {first}") from None
        if not items:
            raise EoprepError(
                f"source: the search of collection {coll.id!r} at {api} found no items for "
                f"bbox {[round(v, 4) for v in geom.bounds]} and datetime {source.datetime}"
            )
        _check_bands(items, coll.bands, f"source.collections[{i}].bands", coll.id)
        found[coll.key] = sorted(items, key=lambda it: (it.datetime, it.id))
    return found


def _check_bands(items: list[pystac.Item], bands: list[str], where: str, collection: str) -> None:
    available: set[str] = set().union(*(item.assets for item in items))
    missing = [b for b in bands if b not in available]
    if missing:
        raise EoprepError(
            f"{where}: {missing} not among the assets of collection {collection!r} "
            f"(available: {', '.join(sorted(available))})"
        )
