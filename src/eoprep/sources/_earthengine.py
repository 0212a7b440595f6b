"""Earth Engine source: EE image metadata becomes STAC items, EE pixels are computed onto each chip grid.

The search returns what the STAC search returns (``pystac.Item`` per image, one asset per band with an
``ee://<collection>/<index>#<band>`` href and ``raster:bands`` metadata), so chip planning, layouts and
sinks work unchanged. Each item carries the serialised server-side collection (filters, mask, python
hook, composite) it came from; the worker rebuilds it, picks the image and asks ``image:computePixels``
for exactly the chip grid (CRS + affine transform + size), tiled under EE's request caps, with retries
on 429/5xx and a cluster-wide concurrency limit per project.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pystac
import shapely
from distributed import WorkerPlugin
from shapely.geometry import mapping, shape

from eoprep.config import (
    EE_REQUEST_BYTES,
    EarthEngineCollectionSpec,
    EarthEngineSourceSpec,
    split_range,
)
from eoprep.errors import EoprepError

__all__ = [
    "EE_MAX_SIDE",
    "EarthEngineInit",
    "EarthEngineSession",
    "build_collection",
    "earthengine_cube",
    "read_earthengine",
    "search_earthengine",
]

#: Earth Engine's cap on the width and height of one computePixels grid.
EE_MAX_SIDE = 32768
#: Item property holding what a worker needs to recompute an item's pixels (no secrets).
ITEM_KEY = "eoprep:ee"
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_DTYPES = {"float": "float32", "double": "float64"}


@dataclass(frozen=True)
class EarthEngineSession:
    """How to reach Earth Engine: API root, project, where credentials come from, and request policy.

    Plain picklable data, shipped to workers; ``credentials`` is a mode (``default``, ``none``) or a
    key-file path, never key material.
    """

    url: str
    project: str | None
    credentials: str = "default"
    max_concurrency: int = 8
    request_bytes: int = EE_REQUEST_BYTES
    retries: int = 5
    backoff: float = 1.0

    @classmethod
    def from_source(cls, source: EarthEngineSourceSpec) -> EarthEngineSession:
        return cls(
            url=source.url.rstrip("/"),
            project=source.project or os.environ.get("EE_PROJECT") or os.environ.get("GOOGLE_CLOUD_PROJECT"),
            credentials=source.credentials,
            max_concurrency=source.max_concurrency,
            request_bytes=source.request_bytes,
            retries=source.request_retries,
            backoff=source.backoff,
        )

    def load_credentials(self) -> tuple[Any, str | None]:
        """Credentials object and the project they imply; errors say what to set, never what a key holds."""
        import ee

        if self.credentials == "none":
            return None, None
        if self.credentials == "default":
            import google.auth
            from google.auth.exceptions import DefaultCredentialsError

            try:
                creds, project = google.auth.default(scopes=ee.oauth.SCOPES)
                return creds, project
            except DefaultCredentialsError:
                pass
            try:
                return ee.data.get_persistent_credentials(), None
            except ee.EEException:
                raise EoprepError(
                    "source.credentials: no Earth Engine credentials found; set GOOGLE_APPLICATION_CREDENTIALS or "
                    "source.credentials to a service-account key file, or run `earthengine authenticate`"
                ) from None
        from google.oauth2 import service_account

        path = Path(self.credentials).expanduser()
        if not path.is_file():
            raise EoprepError(f"source.credentials: service-account key file {path} does not exist")
        try:
            creds = service_account.Credentials.from_service_account_file(str(path), scopes=ee.oauth.SCOPES)
        except (ValueError, KeyError, json.JSONDecodeError) as exc:
            raise EoprepError(
                f"source.credentials: {path} is not a service-account key file ({type(exc).__name__})"
            ) from None
        return creds, creds.project_id

    def initialize(self) -> None:
        """``ee.Initialize`` once per process for this session; our retry policy replaces the client's."""
        global _initialized
        with _init_lock:
            if _initialized == self:
                return
            import ee

            creds, implied = self.load_credentials()
            project = self.project or implied
            if not project:
                raise EoprepError(
                    "source.project: no Google Cloud project for Earth Engine; set source.project or $EE_PROJECT"
                )
            try:
                ee.Initialize(credentials=creds, url=self.url, project=project)
            except ee.EEException as exc:
                raise EoprepError(f"source.url: cannot initialise Earth Engine at {self.url}: {_first(exc)}") from None
            except Exception as exc:
                raise EoprepError(
                    f"source.url: cannot reach Earth Engine at {self.url} ({type(exc).__name__})"
                ) from None
            ee.data.setMaxRetries(0)
            _initialized = self


_init_lock = threading.Lock()
_initialized: EarthEngineSession | None = None


class EarthEngineInit(WorkerPlugin):
    """Initialise Earth Engine on every worker as it starts, so the first chip does not pay for it."""

    name = "eoprep-earthengine"

    def __init__(self, session: EarthEngineSession) -> None:
        self.session = session

    def setup(self, worker: object) -> None:
        self.session.initialize()


def _first(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def _status(exc: BaseException) -> int | None:
    """HTTP status behind an EEException (the ee client drops it; the HttpError is the context)."""
    inner = exc.__cause__ or exc.__context__
    resp = getattr(inner, "resp", None)
    return int(resp.status) if resp is not None else None


def _call(fn: Callable[[], Any], session: EarthEngineSession, what: str) -> Any:
    """Run one EE request under the project's concurrency limit, retrying 429/5xx with jittered backoff."""
    import ee

    attempt = 0
    while True:
        with _request_slot(session):
            try:
                return fn()
            except ee.EEException as exc:
                status = _status(exc)
                if status not in _RETRY_STATUS or attempt == session.retries:
                    raise _translate(exc, status, session, what, attempt) from None
        time.sleep(session.backoff * 2**attempt * (0.5 + random.random()))
        attempt += 1


def _translate(
    exc: BaseException, status: int | None, session: EarthEngineSession, what: str, attempt: int
) -> EoprepError:
    msg = _first(exc)
    if status == 429:
        return EoprepError(
            f"Earth Engine quota exceeded for project {session.project} on {what} after {attempt} retries ({msg}); "
            "lower source.max_concurrency or run again later"
        )
    if status is not None and status >= 500:
        return EoprepError(f"Earth Engine kept failing on {what} after {attempt} retries (HTTP {status}: {msg})")
    if status in (401, 403):
        return EoprepError(f"source.credentials: Earth Engine refused {what} (HTTP {status}: {msg})")
    if "request size" in msg or "grid dimensions" in msg:
        return EoprepError(f"Earth Engine rejected {what} as too large ({msg}); lower source.request_bytes")
    return EoprepError(f"Earth Engine rejected {what}: {msg}")


_semaphores: dict[tuple[str | None, int, bool], Any] = {}


@contextmanager
def _request_slot(session: EarthEngineSession) -> Iterator[None]:
    """A lease on the project's request budget: cluster-wide on a Dask worker, per process elsewhere."""
    from distributed import Semaphore, get_worker

    try:
        get_worker()
        on_worker = True
    except ValueError:
        on_worker = False
    key = (session.project, session.max_concurrency, on_worker)
    sem = _semaphores.get(key)
    if sem is None:
        name = f"eoprep-ee-{session.project}-{session.max_concurrency}"
        sem = (
            Semaphore(max_leases=session.max_concurrency, name=name)
            if on_worker
            else threading.BoundedSemaphore(session.max_concurrency)
        )
        sem = _semaphores.setdefault(key, sem)
    with sem:
        yield


# -- the server-side query --------------------------------------------------------------------------


def build_collection(source: EarthEngineSourceSpec, coll: EarthEngineCollectionSpec, aoi: shapely.Geometry) -> Any:
    """The ``ee.ImageCollection`` a spec's collection describes: dates, AOI, filters, mask, hook, composite."""
    import ee

    start, end = source.time_range
    collection = (
        ee.ImageCollection(coll.id).filterDate(_millis(start), _millis(end) + 1).filterBounds(ee.Geometry(mapping(aoi)))
    )
    ops = {"eq": "eq", "neq": "neq", "lt": "lt", "lte": "lte", "gt": "gt", "gte": "gte", "in": "inList"}
    for prop, tests in coll.filters.items():
        for op, value in tests.items():
            collection = collection.filter(getattr(ee.Filter, ops[op])(prop, value))
    if coll.mask is not None:
        collection = _masked(collection, coll)
    if coll.python is not None:
        try:
            collection = _hook(coll)(collection)
        except (EoprepError, ee.EEException):
            raise
        except Exception as exc:
            raise EoprepError(
                f"source.collections ({coll.id}).python: {coll.python} failed: {type(exc).__name__}: {_first(exc)}"
            ) from None
        if not isinstance(collection, ee.ImageCollection):
            raise EoprepError(f"source.collections ({coll.id}).python: {coll.python} must return an ee.ImageCollection")
    if coll.composite is not None:
        composite = coll.composite
        images = [
            _reduced(collection.filterDate(_millis(a), _millis(b)), composite.reducer).set(
                {"system:index": a.strftime("%Y%m%d"), "system:time_start": _millis(a)}
            )
            for a, b in split_range(start, end, composite.period)
        ]
        collection = ee.ImageCollection.fromImages(images)
    return collection


def _millis(stamp: pd.Timestamp) -> int:
    return int(stamp.timestamp() * 1000)


def _reduced(collection: Any, reducer: str) -> Any:
    return getattr(collection, reducer)()


def _masked(collection: Any, coll: EarthEngineCollectionSpec) -> Any:
    import ee

    mask = coll.mask
    assert mask is not None
    if mask.collection is not None:
        collection = collection.linkCollection(ee.ImageCollection(mask.collection), [mask.band])

    def apply(image: Any) -> Any:
        band = image.select(mask.band)
        if mask.classes is not None:
            bad = functools.reduce(lambda acc, c: acc.Or(band.eq(c)), mask.classes[1:], band.eq(mask.classes[0]))
            keep = bad.Not()
        elif mask.bits is not None:
            keep = band.bitwiseAnd(sum(1 << b for b in mask.bits)).eq(0)
        else:
            keep = band.gte(mask.min)
        return image.updateMask(keep)

    return collection.map(apply)


def _hook(coll: EarthEngineCollectionSpec) -> Callable[[Any], Any]:
    assert coll.python is not None
    module, _, name = coll.python.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise EoprepError(f"source.collections ({coll.id}).python: cannot load {coll.python} ({exc})") from None


# -- search: EE metadata → STAC items ---------------------------------------------------------------


def search_earthengine(
    source: EarthEngineSourceSpec, *, aoi: shapely.Geometry | None = None, client: Any | None = None
) -> dict[str, list[pystac.Item]]:
    """Items per collection key, as :func:`eoprep.sources.search_items` returns them for STAC.

    Parameters
    ----------
    source
        The validated ``kind: earthengine`` source section.
    aoi
        The AOI in lon/lat, if already computed.
    client
        A Dask client whose workers get the :class:`EarthEngineInit` plugin.
    """
    import ee

    from eoprep.sources._stac import aoi_geometry

    session = EarthEngineSession.from_source(source)
    session.initialize()
    geom = aoi if aoi is not None else aoi_geometry(source.aoi)
    found: dict[str, list[pystac.Item]] = {}
    for i, coll in enumerate(source.collections):
        collection = build_collection(source, coll, geom)
        info = _call(lambda c=collection: c.limit(source.max_items).getInfo(), session, f"the search of {coll.id}")
        features = [f for f in info.get("features", []) if f.get("bands")]
        if not features:
            raise EoprepError(
                f"source: the search of collection {coll.id!r} in Earth Engine found no images for "
                f"bbox {[round(v, 4) for v in geom.bounds]} and datetime {source.datetime}"
            )
        available = {b["id"]: b for f in features for b in f["bands"]}
        missing = [b for b in coll.bands if b not in available]
        if missing:
            raise EoprepError(
                f"source.collections[{i}].bands: {missing} not among the bands of Earth Engine collection "
                f"{coll.id!r} (available: {', '.join(sorted(available))})"
            )
        shared = {"session": asdict(session), "collection": ee.serializer.toJSON(collection)}
        items = [_item(f, coll, available, shared, geom) for f in features]
        found[coll.key] = sorted(items, key=lambda it: (it.datetime, it.id))
    if client is not None:
        client.register_plugin(EarthEngineInit(session))
    return found


def _band_dtype(band: dict[str, Any]) -> np.dtype:
    info = band.get("data_type", {})
    precision = info.get("precision", "float")
    if precision in _DTYPES:
        return np.dtype(_DTYPES[precision])
    lo, hi = info.get("min", -(2**31)), info.get("max", 2**31 - 1)
    for name in ("uint8", "int8", "uint16", "int16", "uint32", "int32"):
        limits = np.iinfo(name)
        if limits.min <= lo and hi <= limits.max:
            return np.dtype(name)
    return np.dtype("float64")


def _item(
    feature: dict[str, Any],
    coll: EarthEngineCollectionSpec,
    bands: dict[str, dict[str, Any]],
    shared: dict[str, Any],
    aoi: shapely.Geometry,
) -> pystac.Item:
    props = feature.get("properties", {})
    index = str(props["system:index"])
    ring = props.get("system:footprint")
    geom = shapely.Polygon(ring["coordinates"]) if ring and ring.get("type") == "LinearRing" else None
    if ring and geom is None:
        geom = shape(ring)
    if geom is None or coll.composite is not None:
        geom = aoi
    when = pd.Timestamp(props["system:time_start"], unit="ms", tz="UTC")
    extra = (
        {"updated": pd.Timestamp(int(feature["version"]), unit="us", tz="UTC").isoformat()}
        if "version" in feature
        else {}
    )
    item = pystac.Item(
        id=f"{coll.id}/{index}",
        geometry=mapping(geom),
        bbox=list(geom.bounds),
        datetime=when.to_pydatetime(),
        properties={**extra, "ee:index": index, ITEM_KEY: {**shared, "index": index}},
        collection=coll.id,
    )
    for band in coll.bands:
        dtype = _band_dtype(bands[band])
        nodata = float("nan") if dtype.kind == "f" else 0
        item.add_asset(
            band,
            pystac.Asset(
                href=f"ee://{coll.id}/{index}#{band}",
                media_type="application/x-npy",
                roles=["data"],
                extra_fields={"raster:bands": [{"data_type": dtype.name, "nodata": nodata}]},
            ),
        )
    return item


# -- the worker-side read ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _collection(expression: str) -> Any:
    import ee

    return ee.ImageCollection(ee.deserializer.fromCloudApiJSON(expression))


def request_tiles(size: int, bytes_per_pixel: int, request_bytes: int) -> list[tuple[int, int, int, int]]:
    """Square tiles (row, col, height, width) covering a ``size``² grid, each request under the caps."""
    side = min(size, EE_MAX_SIDE, int((request_bytes // bytes_per_pixel) ** 0.5))
    if side < 1:
        raise EoprepError(
            f"source.request_bytes: {request_bytes} bytes cannot hold one pixel of {bytes_per_pixel} bytes"
        )
    return [
        (r, c, min(side, size - r), min(side, size - c)) for r in range(0, size, side) for c in range(0, size, side)
    ]


def read_earthengine(
    items: Sequence[dict[str, Any]],
    bands: Sequence[str],
    grid: Any,
    *,
    dtype: np.dtype,
    nodata: float,
) -> np.ndarray:
    """Pixels of each EE item on the chip grid, shaped (item, band, y, x); masked pixels become ``nodata``.

    One computePixels call per item and tile asks for the bands (unmasked to 0) plus one validity band
    each, so masks survive for any dtype.
    """
    import ee

    out = np.full((len(items), len(bands), grid.size, grid.size), nodata, dtype=dtype)
    valid_names = [f"{b}__valid" for b in bands]
    for i, item in enumerate(items):
        meta = item["properties"][ITEM_KEY]
        session = EarthEngineSession(**meta["session"])
        session.initialize()
        image = ee.Image(_collection(meta["collection"]).filter(ee.Filter.eq("system:index", meta["index"])).first())
        image = image.select(list(bands))
        request = image.unmask(0, False).addBands(image.mask().gt(0).toByte().rename(valid_names))
        bytes_per_pixel = len(bands) * (dtype.itemsize + 1) + len(bands) * 2
        for r, c, h, w in request_tiles(grid.size, bytes_per_pixel, session.request_bytes):
            params = {
                "expression": request,
                "fileFormat": "NUMPY_NDARRAY",
                "grid": {
                    "dimensions": {"width": w, "height": h},
                    "affineTransform": {
                        "scaleX": grid.pixel_size,
                        "shearX": 0.0,
                        "translateX": grid.x0 + c * grid.pixel_size,
                        "shearY": 0.0,
                        "scaleY": -grid.pixel_size,
                        "translateY": grid.y0 - r * grid.pixel_size,
                    },
                    "crsCode": grid.crs,
                },
            }
            raw = _call(
                lambda p=params: ee.data.computePixels(p),
                session,
                f"computePixels of {item['id']} for {grid.crs} {r},{c}",
            )
            for k, band in enumerate(bands):
                valid = raw[valid_names[k]] != 0
                out[i, k, r : r + h, c : c + w] = np.where(valid, raw[band].astype(dtype, copy=False), nodata)
    return out


# -- lazy cubes through xee -------------------------------------------------------------------------


def earthengine_cube(
    source: EarthEngineSourceSpec,
    *,
    crs: str,
    transform: tuple[float, float, float, float, float, float],
    shape: tuple[int, int],
    collection: str | None = None,
    aoi: shapely.Geometry | None = None,
) -> Any:
    """A lazy ``xarray.Dataset`` (time, y, x per band) of one spec collection through xee.

    Dask chunks are xee's request tiles, sized by ``source.request_bytes``, so every chunk is one
    computePixels call within Earth Engine's caps; workers initialise Earth Engine themselves.

    Parameters
    ----------
    source
        The ``kind: earthengine`` source section.
    crs, transform, shape
        The output grid: CRS, affine ``(a, b, c, d, e, f)`` and ``(height, width)``.
    collection
        Key or id of the spec collection (default: the first).
    aoi
        The AOI in lon/lat, if already computed.
    """
    import xarray as xr

    from eoprep.sources._stac import aoi_geometry

    coll = next((c for c in source.collections if collection in (None, c.key, c.id)), None)
    if coll is None:
        raise EoprepError(f"earthengine_cube: no collection {collection!r} in the source")
    session = EarthEngineSession.from_source(source)
    session.initialize()
    geom = aoi if aoi is not None else aoi_geometry(source.aoi)
    images = build_collection(source, coll, geom).select(list(coll.bands))
    height, width = shape
    return xr.open_dataset(
        images,
        engine="ee",
        crs=crs,
        crs_transform=tuple(transform),
        shape_2d=(width, height),
        chunks={},
        request_byte_limit=session.request_bytes,
        ee_init_if_necessary=True,
        ee_init_kwargs={
            "url": session.url,
            "project": session.project,
            "credentials_function": _xee_credentials(session),
        },
        getitem_kwargs={"max_retries": session.retries, "initial_delay": int(session.backoff * 1000)},
    )


def _xee_credentials(session: EarthEngineSession) -> Callable[[], Any]:
    return functools.partial(_credentials_only, session)


def _credentials_only(session: EarthEngineSession) -> Any:
    return session.load_credentials()[0]
