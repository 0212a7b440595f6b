"""A fake Earth Engine REST API: a real stdlib HTTP server the `ee` client and xee talk to offline.

It serves the discovery document and algorithm list shipped in the earthengine-api wheel, answers
``value:compute`` by evaluating the expression graph the client sends against an in-memory catalog,
and ``image:computePixels`` with NPY pixels generated deterministically from each image id, band and
pixel-centre coordinate (:func:`fake_pixels`), so tests can predict every value the pipeline writes.
Only the slice of the EE algebra eoprep and xee use is implemented; anything else is a 400 naming it.
"""

from __future__ import annotations

import io
import json
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import shapely
from pyproj import Transformer
from shapely.geometry import shape

_RENDER_LOCK = threading.Lock()

__all__ = ["EE_LIMIT_BYTES", "FakeEarthEngine", "FakeImage", "fake_pixels"]

EE_LIMIT_BYTES = 48 * 2**20
EE_LIMIT_SIDE = 32768
_EE_DIR = Path(__import__("ee").__file__).parent / "tests"
_DTYPES = {
    "uint8": {"precision": "int", "min": 0, "max": 255},
    "int8": {"precision": "int", "min": -128, "max": 127},
    "uint16": {"precision": "int", "min": 0, "max": 65535},
    "int16": {"precision": "int", "min": -32768, "max": 32767},
    "int32": {"precision": "int", "min": -(2**31), "max": 2**31 - 1},
    "float32": {"precision": "float"},
    "float64": {"precision": "double"},
}


def fake_pixels(image_id: str, band: str, x: np.ndarray, y: np.ndarray, dtype: str) -> np.ndarray:
    """The value of ``band`` of ``image_id`` at pixel centres (x, y) of the request's CRS."""
    seed = zlib.crc32(f"{image_id}/{band}".encode()) % 97
    ramp = (np.floor(x / 10).astype(np.int64) * 3 + np.floor(y / 10).astype(np.int64) * 5) % 1000
    values = seed + 1 + ramp
    return (values / 1000.0).astype(dtype) if np.dtype(dtype).kind == "f" else values.astype(dtype)


class EEError(Exception):
    """An error the fake answers with, as the real API does: status code and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class _Grid:
    crs: str
    transform: tuple[float, float, float, float, float, float]
    width: int
    height: int

    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        a, b, c, d, e, f = self.transform
        col, row = np.meshgrid(np.arange(self.width) + 0.5, np.arange(self.height) + 0.5)
        return a * col + b * row + c, d * col + e * row + f

    def lonlat(self) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.centres()
        return Transformer.from_crs(self.crs, "EPSG:4326", always_xy=True).transform(x, y)


Planes = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class FakeImage:
    """An image of the fake catalog or computed from one: bands, properties and a pixel function."""

    bands: dict[str, str]
    props: dict[str, Any]
    render: Callable[[_Grid], Planes]
    id: str | None = None

    @classmethod
    def asset(
        cls, collection: str, index: str, time: str, footprint: dict[str, Any], bands: dict[str, str], **props: Any
    ) -> FakeImage:
        """A stored image: its pixels are :func:`fake_pixels` inside ``footprint`` (GeoJSON, lon/lat)."""
        image_id = f"{collection}/{index}"
        poly = shape(footprint)

        def render(grid: _Grid) -> Planes:
            x, y = grid.centres()
            lon, lat = grid.lonlat()
            inside = shapely.contains_xy(poly, lon, lat)
            return {b: (fake_pixels(image_id, b, x, y, t), inside) for b, t in bands.items()}

        ring = {"type": "LinearRing", "coordinates": list(poly.exterior.coords)}
        start = int(pd.Timestamp(time).timestamp() * 1000)
        meta = {"system:index": index, "system:time_start": start, "system:footprint": ring, **props}
        return cls(dict(bands), meta, render, image_id)

    def info(self) -> dict[str, Any]:
        bands = [
            {
                "id": b,
                "data_type": {"type": "PixelType", **_DTYPES[t]},
                "crs": "EPSG:4326",
                "crs_transform": [1, 0, 0, 0, 1, 0],
            }
            for b, t in self.bands.items()
        ]
        out: dict[str, Any] = {"type": "Image", "bands": bands, "properties": dict(self.props)}
        if self.id:
            out["id"] = self.id
        return out

    def derive(self, bands: dict[str, str], render: Callable[[_Grid], Planes]) -> FakeImage:
        return FakeImage(bands, self.props, render, None)


@dataclass(frozen=True)
class _Collection:
    images: tuple[FakeImage, ...]
    id: str | None = None

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "ImageCollection", "bands": [], "features": [i.info() for i in self.images]}
        if self.id:
            out["id"] = self.id
        return out


@dataclass
class _Call:
    """A function value of the expression graph (a functionDefinitionValue or an algorithm)."""

    names: list[str]
    body: Callable[[dict[str, Any]], Any]

    def __call__(self, *args: Any) -> Any:
        return self.body(dict(zip(self.names, args, strict=False)))


def _pointwise(fn: Callable[[np.ndarray, np.ndarray], np.ndarray], out_type: str | None = None) -> Callable[..., Any]:
    def op(a: dict[str, Any]) -> FakeImage:
        left, right = a["image1"], a["image2"]
        if not isinstance(right, FakeImage):
            right = _constant(right)

        def render(grid: _Grid) -> Planes:
            p, q = left.render(grid), right.render(grid)
            qs = list(q.values())
            out = {}
            for i, (name, (v, m)) in enumerate(p.items()):
                w, n = qs[i] if len(qs) > 1 else qs[0]
                out[name] = (fn(v, w).astype(out_type or v.dtype), m & n)
            return out

        return left.derive({b: out_type or t for b, t in left.bands.items()}, render)

    return op


def _constant(value: Any) -> FakeImage:
    dtype = "float64" if isinstance(value, float) else "int32"

    def render(grid: _Grid) -> Planes:
        shape_ = (grid.height, grid.width)
        return {"constant": (np.full(shape_, value, dtype=dtype), np.ones(shape_, bool))}

    return FakeImage({"constant": dtype}, {}, render)


def _select(a: dict[str, Any]) -> FakeImage:
    image: FakeImage = a["input"]
    names = list(image.bands)
    chosen = []
    for sel in a["bandSelectors"]:
        if isinstance(sel, int):
            chosen.append(names[sel])
            continue
        if sel not in image.bands:
            raise EEError(400, f"Image.select: Pattern '{sel}' did not match any bands. Available bands: {names}")
        chosen.append(sel)
    new = list(a.get("newNames") or chosen)
    bands = {n: image.bands[c] for n, c in zip(new, chosen, strict=True)}
    return image.derive(bands, lambda g: {n: image.render(g)[c] for n, c in zip(new, chosen, strict=True)})


def _update_mask(a: dict[str, Any]) -> FakeImage:
    image, mask = a["image"], a["mask"]

    def render(grid: _Grid) -> Planes:
        planes, masks = image.render(grid), list(mask.render(grid).values())
        return {
            b: (v, m & (masks[i if len(masks) > 1 else 0][0] != 0) & masks[i if len(masks) > 1 else 0][1])
            for i, (b, (v, m)) in enumerate(planes.items())
        }

    return image.derive(image.bands, render)


def _mask(a: dict[str, Any]) -> FakeImage:
    image = a["image"]
    return image.derive(
        {b: "float32" for b in image.bands},
        lambda g: {b: (m.astype("float32"), np.ones_like(m)) for b, (v, m) in image.render(g).items()},
    )


def _unmask(a: dict[str, Any]) -> FakeImage:
    image, value = a["input"], a.get("value", 0)
    fill = value if isinstance(value, FakeImage) else _constant(value)

    def render(grid: _Grid) -> Planes:
        f = next(iter(fill.render(grid).values()))[0]
        return {b: (np.where(m, v, f.astype(v.dtype)), np.ones_like(m)) for b, (v, m) in image.render(grid).items()}

    return image.derive(image.bands, render)


def _cast(dtype: str) -> Callable[[dict[str, Any]], FakeImage]:
    def op(a: dict[str, Any]) -> FakeImage:
        image = a["value"]
        return image.derive(
            {b: dtype for b in image.bands},
            lambda g: {b: (v.astype(dtype), m) for b, (v, m) in image.render(g).items()},
        )

    return op


def _rename(a: dict[str, Any]) -> FakeImage:
    image, names = a["input"], list(a["names"])
    old = list(image.bands)
    return image.derive(
        dict(zip(names, image.bands.values(), strict=True)),
        lambda g: dict(zip(names, (image.render(g)[b] for b in old), strict=True)),
    )


def _add_bands(a: dict[str, Any]) -> FakeImage:
    """Like EE, a name already taken in ``dstImg`` gets a numeric suffix (``B02_1``) unless overwritten."""
    dst, src, names = a["dstImg"], a["srcImg"], a.get("names")
    taken, renames = set(dst.bands), {}
    for b in src.bands:
        if names is not None and b not in names:
            continue
        new, k = b, 0
        while new in taken and not a.get("overwrite"):
            k += 1
            new = f"{b}_{k}"
        taken.add(new)
        renames[b] = new
    bands = {**dst.bands, **{n: src.bands[b] for b, n in renames.items()}}

    def render(grid: _Grid) -> Planes:
        planes = src.render(grid)
        return {**dst.render(grid), **{n: planes[b] for b, n in renames.items()}}

    return FakeImage(bands, dst.props, render)


def _reduce(how: str) -> Callable[[dict[str, Any]], FakeImage]:
    def op(a: dict[str, Any]) -> FakeImage:
        images: tuple[FakeImage, ...] = a["collection"].images
        if not images:
            return FakeImage({}, {}, lambda g: {})
        bands = dict(images[0].bands)

        def render(grid: _Grid) -> Planes:
            planes = [i.render(grid) for i in images]
            out = {}
            for b, t in bands.items():
                values = np.stack([p[b][0] for p in planes]).astype("float64")
                valid = np.stack([p[b][1] for p in planes])
                if how == "mosaic":
                    last = valid.shape[0] - 1 - np.argmax(valid[::-1], axis=0)
                    v = np.take_along_axis(values, last[None], 0)[0]
                else:
                    v = np.nan_to_num(getattr(np, f"nan{how}")(np.where(valid, values, np.nan), axis=0))
                out[b] = (v.astype(t if how == "mosaic" else "float64"), valid.any(axis=0))
            return out

        out_bands = bands if how == "mosaic" else {b: "float64" for b in bands}
        return FakeImage(out_bands, {}, render)

    return op


def _filter(fn: Callable[[dict[str, Any], dict[str, Any]], bool]) -> Callable[[dict[str, Any]], Any]:
    return lambda a: lambda props: fn(a, props)


def _value(a: dict[str, Any], props: dict[str, Any]) -> tuple[Any, Any]:
    left = props.get(a["leftField"]) if "leftField" in a else a.get("leftValue")
    right = props.get(a["rightField"]) if "rightField" in a else a.get("rightValue")
    return left, right


def _intersects(a: dict[str, Any], props: dict[str, Any]) -> bool:
    footprint = props.get("system:footprint")
    if footprint is None:
        return True
    poly = shapely.Polygon(footprint["coordinates"])
    return poly.intersects(a["rightValue"] if "rightValue" in a else a["leftValue"])


def _date(value: Any) -> int:
    if isinstance(value, int | float):
        return int(value)
    stamp = pd.Timestamp(value)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp
    return int(stamp.timestamp() * 1000)


def _date_range(a: dict[str, Any]) -> tuple[int, int]:
    return _date(a["start"]), _date(a["end"])


def _in_range(a: dict[str, Any], props: dict[str, Any]) -> bool:
    (start, end), t = a["leftValue"], props.get(a["rightField"])
    return t is not None and start <= t < end


def _set(a: dict[str, Any]) -> FakeImage:
    image = a["object"]
    extra = a["properties"] if "properties" in a else {a["key"]: a["value"]}
    return replace(image, props={**image.props, **extra}, id=image.id)


def _toList(a: dict[str, Any]) -> list[FakeImage]:
    offset = a.get("offset", 0)
    return list(a["collection"].images[offset : offset + a["count"]])


def _iterate(a: dict[str, Any]) -> Any:
    acc = a["first"]
    for image in a["collection"].images:
        acc = a["function"](image, acc)
    return acc


def _reduce_columns(a: dict[str, Any]) -> dict[str, Any]:
    images, selectors = a["collection"].images, a["selectors"]
    return {"list": [[i.props.get(s) if s != "system:id" else i.id for i in images] for s in selectors]}


def _footprint(a: dict[str, Any]) -> shapely.Geometry:
    return shape({"type": "Polygon", "coordinates": a["coordinates"]})


def _rectangle(a: dict[str, Any]) -> shapely.Geometry:
    c = a["coordinates"]
    flat = [v for p in c for v in p] if isinstance(c[0], list) else c
    return shapely.box(*flat)


def _link(a: dict[str, Any]) -> _Collection:
    other = {i.props.get("system:index"): i for i in a["otherCollection"].images}
    bands = list(a.get("linkedBands") or [])
    out = []
    for image in a["imageCollection"].images:
        match = other.get(image.props.get("system:index"))
        if match is not None and bands:
            linked = _select({"input": match, "bandSelectors": bands})
            image = replace(_add_bands({"dstImg": image, "srcImg": linked}), id=image.id)
        out.append(image)
    return _Collection(tuple(out))


def _not_image(a: dict[str, Any]) -> FakeImage:
    image = a["value"]
    return image.derive(
        {b: "uint8" for b in image.bands},
        lambda g: {b: ((v == 0).astype("uint8"), m) for b, (v, m) in image.render(g).items()},
    )


class FakeEarthEngine:
    """The fake server: a catalog of collections, a request log, and scripted faults.

    Parameters
    ----------
    collections
        Collection id → its stored images.
    request_byte_limit
        The ``computePixels`` size cap it enforces (the real one is 48 MiB).
    """

    def __init__(
        self, collections: dict[str, Sequence[FakeImage]], *, request_byte_limit: int = EE_LIMIT_BYTES
    ) -> None:
        self.collections = {k: tuple(v) for k, v in collections.items()}
        self.request_byte_limit = request_byte_limit
        self.requests: list[dict[str, Any]] = []
        self.faults: list[tuple[Callable[[dict[str, Any]], bool], int, str]] = []
        self.access_token: str | None = None
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._functions = self._algebra()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_port}"

    def pixel_requests(self) -> list[dict[str, Any]]:
        """Bodies of the computePixels requests received so far."""
        return [r["body"] for r in self.requests if r["path"].endswith("image:computePixels")]

    def fail(
        self, status: int, *, times: int | None = None, when: Callable[[dict[str, Any]], bool] | None = None
    ) -> None:
        """Answer the next ``times`` computePixels requests matching ``when`` with ``status`` (all, if None)."""
        left = [times if times is not None else -1]

        def match(body: dict[str, Any]) -> bool:
            if left[0] == 0 or (when is not None and not when(body)):
                return False
            left[0] -= 1
            return True

        message = "Too many concurrent aggregations." if status == 429 else "Internal error, try again."
        self.faults.append((match, status, message))

    @contextmanager
    def running(self) -> Iterator[FakeEarthEngine]:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()

    # -- expression evaluation -------------------------------------------------------------------

    def evaluate(self, expression: dict[str, Any]) -> Any:
        values = expression["values"]
        return self._node(values[expression["result"]], values, {})

    def _node(self, node: dict[str, Any], values: dict[str, Any], env: dict[str, Any]) -> Any:
        if "constantValue" in node:
            return node["constantValue"]
        if "integerValue" in node:
            return int(node["integerValue"])
        if "valueReference" in node:
            return self._node(values[node["valueReference"]], values, env)
        if "argumentReference" in node:
            return env[node["argumentReference"]]
        if "arrayValue" in node:
            return [self._node(v, values, env) for v in node["arrayValue"]["values"]]
        if "dictionaryValue" in node:
            return {k: self._node(v, values, env) for k, v in node["dictionaryValue"]["values"].items()}
        if "functionDefinitionValue" in node:
            spec = node["functionDefinitionValue"]
            body = values[spec["body"]]
            return _Call(spec["argumentNames"], lambda bound: self._node(body, values, {**env, **bound}))
        call = node["functionInvocationValue"]
        args = {k: self._node(v, values, env) for k, v in call.get("arguments", {}).items()}
        if "functionReference" in call:
            fn = self._node(values[call["functionReference"]], values, env)
            return fn.body(args)
        name = call["functionName"]
        if name not in self._functions:
            raise EEError(400, f"fake Earth Engine: {name} is not implemented")
        return self._functions[name](args)

    def _load(self, a: dict[str, Any]) -> _Collection:
        cid = a["id"]
        if cid not in self.collections:
            raise EEError(
                400,
                f"ImageCollection.load: ImageCollection asset '{cid}' not found "
                "(does not exist or caller does not have access).",
            )
        return _Collection(self.collections[cid], cid)

    def _load_image(self, a: dict[str, Any]) -> FakeImage:
        for images in self.collections.values():
            for image in images:
                if image.id == a["id"]:
                    return image
        raise EEError(
            400, f"Image.load: Image asset '{a['id']}' not found (does not exist or caller does not have access)."
        )

    def _algebra(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        def coll(fn: Callable[..., Any]) -> Callable[[dict[str, Any]], Any]:
            return lambda a: fn(a["collection"].images, a)

        return {
            "ImageCollection.load": self._load,
            "Image.load": self._load_image,
            "ImageCollection.fromImages": lambda a: _Collection(tuple(a["images"])),
            "ImageCollection.mosaic": _reduce("mosaic"),
            "ImageCollection.linkCollection": _link,
            "reduce.median": _reduce("median"),
            "reduce.mean": _reduce("mean"),
            "reduce.min": _reduce("min"),
            "reduce.max": _reduce("max"),
            "Collection.filter": coll(lambda im, a: _Collection(tuple(i for i in im if a["filter"](i.props)))),
            "Collection.map": coll(lambda im, a: _Collection(tuple(a["baseAlgorithm"](i) for i in im))),
            "Collection.limit": coll(
                lambda im, a: _Collection(
                    tuple(sorted(im, key=lambda i: i.props.get(a["key"], 0)) if a.get("key") else im)[: a["limit"]]
                )
            ),
            "Collection.first": coll(lambda im, a: im[0] if im else None),
            "Collection.size": coll(lambda im, a: len(im)),
            "Collection.toList": _toList,
            "Collection.iterate": _iterate,
            "Collection.reduceColumns": _reduce_columns,
            "Element.toDictionary": lambda a: dict(a["element"].props if isinstance(a["element"], FakeImage) else {}),
            "Element.set": _set,
            "Element.setMulti": _set,
            "Filter.dateRangeContains": _filter(_in_range),
            "Filter.intersects": _filter(_intersects),
            "Filter.equals": _filter(lambda a, p: (lambda lv, rv: lv == rv)(*_value(a, p))),
            "Filter.notEquals": _filter(lambda a, p: (lambda lv, rv: lv != rv)(*_value(a, p))),
            "Filter.lessThan": _filter(lambda a, p: (lambda lv, rv: lv is not None and lv < rv)(*_value(a, p))),
            "Filter.greaterThan": _filter(lambda a, p: (lambda lv, rv: lv is not None and lv > rv)(*_value(a, p))),
            "Filter.listContains": _filter(lambda a, p: (lambda lv, rv: rv in lv)(*_value(a, p))),
            "Filter.not": lambda a: lambda p: not a["filter"](p),
            "Filter.and": lambda a: lambda p: all(f(p) for f in a["filters"]),
            "Filter.or": lambda a: lambda p: any(f(p) for f in a["filters"]),
            "DateRange": _date_range,
            "Date": lambda a: _date(a["value"]),
            "Feature": lambda a: a["geometry"],
            "GeometryConstructors.Polygon": _footprint,
            "GeometryConstructors.Rectangle": _rectangle,
            "Image.select": _select,
            "Image.updateMask": _update_mask,
            "Image.mask": _mask,
            "Image.unmask": _unmask,
            "Image.constant": lambda a: _constant(a["value"]),
            "Image.rename": _rename,
            "Image.addBands": _add_bands,
            "Image.bandNames": lambda a: list(a["image"].bands),
            "Image.toByte": _cast("uint8"),
            "Image.toUint8": _cast("uint8"),
            "Image.toUint16": _cast("uint16"),
            "Image.toFloat": _cast("float32"),
            "Image.toDouble": _cast("float64"),
            "Image.eq": _pointwise(np.equal, "uint8"),
            "Image.neq": _pointwise(np.not_equal, "uint8"),
            "Image.gt": _pointwise(np.greater, "uint8"),
            "Image.gte": _pointwise(np.greater_equal, "uint8"),
            "Image.lt": _pointwise(np.less, "uint8"),
            "Image.lte": _pointwise(np.less_equal, "uint8"),
            "Image.and": _pointwise(lambda x, y: (x != 0) & (y != 0), "uint8"),
            "Image.or": _pointwise(lambda x, y: (x != 0) | (y != 0), "uint8"),
            "Image.bitwiseAnd": _pointwise(np.bitwise_and),
            "Image.not": _not_image,
            "Dictionary.get": lambda a: a["dictionary"][a["key"]],
            "List.slice": lambda a: a["list"][a.get("start", 0) : a.get("end")],
            "Reducer.toList": lambda a: ("toList", 1),
            "Reducer.repeat": lambda a: ("toList", a["count"]),
        }

    # -- computePixels ---------------------------------------------------------------------------

    def compute_pixels(self, body: dict[str, Any]) -> bytes:
        image = self.evaluate(body["expression"])
        if not isinstance(image, FakeImage):
            raise EEError(400, "computePixels: the expression is not an Image")
        g = body.get("grid") or {}
        dims = g.get("dimensions", {})
        width, height = int(dims.get("width", 0)), int(dims.get("height", 0))
        if width > EE_LIMIT_SIDE or height > EE_LIMIT_SIDE:
            raise EEError(
                400, f"Request grid dimensions ({width}x{height}) must be less than or equal to {EE_LIMIT_SIDE}."
            )
        bands = list(body.get("bandIds") or image.bands)
        size = width * height * sum(np.dtype(image.bands[b]).itemsize for b in bands)
        if size > self.request_byte_limit:
            raise EEError(
                400, f"Total request size ({size} bytes) must be less than or equal to {self.request_byte_limit} bytes."
            )
        t = g["affineTransform"]
        transform = tuple(
            float(t.get(k, 0.0)) for k in ("scaleX", "shearX", "translateX", "shearY", "scaleY", "translateY")
        )
        with _RENDER_LOCK:  # GEOS/PROJ objects shared between request threads are not thread-safe
            planes = image.render(_Grid(g["crsCode"], transform, width, height))  # type: ignore[arg-type]
        out = np.zeros((height, width), dtype=[(b, image.bands[b]) for b in bands])
        for b in bands:
            values, valid = planes[b]
            out[b] = np.where(valid, values, 0)
        buf = io.BytesIO()
        np.save(buf, out, allow_pickle=False)
        return buf.getvalue()


def _info(value: Any) -> Any:
    if isinstance(value, FakeImage | _Collection):
        return value.info()
    if isinstance(value, list):
        return [_info(v) for v in value]
    if isinstance(value, dict):
        return {k: _info(v) for k, v in value.items()}
    return value


class _Handler(BaseHTTPRequestHandler):
    fake: FakeEarthEngine

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        names = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}
        payload = {"error": {"code": status, "message": message, "status": names.get(status, "INTERNAL")}}
        self._send(status, json.dumps(payload).encode())

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?")[0]
        if path.endswith("$discovery/rest"):
            self._send(200, (_EE_DIR / "cloud_api_discovery_document.json").read_bytes())
        elif path.endswith("/algorithms"):
            self._send(200, (_EE_DIR / "algorithms.json").read_bytes())
        else:
            self._error(404, f"fake Earth Engine: no GET {path}")

    def do_POST(self) -> None:  # noqa: N802
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        path = self.path.split("?")[0]
        fake = self.fake
        if path.endswith("/token"):
            fake.access_token = "fake-access-token"
            self._send(
                200,
                json.dumps({"access_token": fake.access_token, "expires_in": 3600, "token_type": "Bearer"}).encode(),
            )
            return
        body = json.loads(raw or b"{}")
        with fake._lock:
            fake.requests.append({"path": path, "body": body, "auth": self.headers.get("Authorization")})
            fault = next(
                ((s, m) for match, s, m in fake.faults if path.endswith("computePixels") and match(body)), None
            )
        if fault is not None:
            self._error(*fault)
            return
        try:
            if path.endswith("value:compute"):
                self._send(200, json.dumps({"result": _info(fake.evaluate(body["expression"]))}).encode())
            elif path.endswith("image:computePixels"):
                self._send(200, fake.compute_pixels(body), "application/octet-stream")
            else:
                self._error(404, f"fake Earth Engine: no POST {path}")
        except EEError as exc:
            self._error(exc.status, str(exc))
        except Exception as exc:  # a gap in the fake itself: loud, and never retried as a 5xx would be
            self._error(400, f"fake Earth Engine failed: {type(exc).__name__}: {exc}")
