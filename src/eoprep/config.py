"""Pipeline specs: YAML files validated into typed models, with errors that name the file and key."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import pandas as pd
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from eoprep.errors import SpecError

__all__ = [
    "AlignSpec",
    "AoiSpec",
    "CollectionSpec",
    "EarthEngineCollectionSpec",
    "EarthEngineCompositeSpec",
    "EarthEngineMaskSpec",
    "EarthEngineSourceSpec",
    "GridSpec",
    "LoaderSpec",
    "OutputSpec",
    "PipelineSpec",
    "QualitySpec",
    "SourceSpec",
    "TimeSpec",
    "load_spec",
    "parse_spec",
]

EMBEDDED = "embedded"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CollectionSpec(_Model):
    """One STAC collection and the asset keys (bands) to take from it."""

    id: str
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_]+$")
    bands: list[str] = Field(min_length=1)
    resampling: dict[str, str] = Field(default_factory=dict)
    #: In ``scenes`` mode, pair each date of the first collection without a tolerance with this
    #: collection's nearest acquisition within it (e.g. ``6D``), instead of keeping its own dates.
    match_tolerance: str | None = None

    @field_validator("match_tolerance")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                pd.Timedelta(value)
            except ValueError:
                raise ValueError(f"{value!r} is not a duration such as '6D' or '36h'") from None
        return value

    @property
    def key(self) -> str:
        """Name of the output group: `name`, or the collection id made path-safe."""
        return self.name or "".join(c if c.isalnum() else "_" for c in self.id)

    @model_validator(mode="after")
    def _resampling_names_bands(self) -> CollectionSpec:
        unknown = sorted(set(self.resampling) - set(self.bands))
        if unknown:
            raise ValueError(f"resampling names bands not in `bands`: {unknown}")
        return self


class AoiSpec(_Model):
    """Area of interest: a bbox or a GeoJSON file, in lon/lat unless `crs` says otherwise."""

    crs: str = "EPSG:4326"
    bbox: tuple[float, float, float, float] | None = None
    geojson: Path | None = None

    @field_validator("bbox")
    @classmethod
    def _lon_lat(cls, bbox: tuple[float, float, float, float] | None, info: ValidationInfo) -> Any:
        if bbox is None or str(info.data.get("crs", "")).upper() not in ("EPSG:4326", "OGC:CRS84"):
            return bbox
        w, s, e, n = bbox
        if not (-180 <= w <= 180 and -180 <= e <= 180 and -90 <= s <= 90 and -90 <= n <= 90):
            raise ValueError(
                f"bbox {list(bbox)} is not lon/lat degrees; give EPSG:4326 values "
                "or set source.aoi.crs to the bbox's CRS (e.g. crs: EPSG:32632)"
            )
        if s >= n:
            raise ValueError(f"bbox {list(bbox)} has south >= north")
        return bbox

    @model_validator(mode="after")
    def _one_of(self) -> AoiSpec:
        if (self.bbox is None) == (self.geojson is None):
            raise ValueError("give exactly one of `bbox` or `geojson`")
        return self


class SourceSpec(_Model):
    """Where items come from: a STAC API (or the embedded demo catalog) and the search."""

    kind: Literal["stac"] = "stac"
    url: str = EMBEDDED
    collections: list[CollectionSpec] = Field(min_length=1)
    aoi: AoiSpec
    datetime: str
    query: dict[str, Any] | None = None
    filter: dict[str, Any] | None = None
    filter_lang: Literal["cql2-json", "cql2-text"] = "cql2-json"
    sign: Literal["planetary-computer"] | None = None
    max_items: int = Field(10_000, gt=0)
    retries: int = Field(5, ge=0)
    timeout: float = Field(30.0, gt=0)

    @field_validator("datetime")
    @classmethod
    def _closed_range(cls, value: str) -> str:
        return _closed_range(value)

    @model_validator(mode="after")
    def _unique_keys(self) -> SourceSpec:
        keys = [c.key for c in self.collections]
        if len(set(keys)) != len(keys):
            raise ValueError(f"collection names must be unique, got {keys}")
        return self

    @property
    def time_range(self) -> tuple[pd.Timestamp, pd.Timestamp]:
        """Start and end as UTC timestamps; an end given as a date includes that whole day."""
        start_s, end_s = self.datetime.split("/")
        start, end = pd.Timestamp(start_s), pd.Timestamp(end_s)
        start = start.tz_localize("UTC") if start.tzinfo is None else start.tz_convert("UTC")
        end = end.tz_localize("UTC") if end.tzinfo is None else end.tz_convert("UTC")
        if len(end_s) == 10:
            end = end + pd.Timedelta(days=1) - pd.Timedelta(microseconds=1)
        return start, end


def _closed_range(value: str) -> str:
    parts = value.split("/")
    if len(parts) != 2 or ".." in parts or "" in parts:
        raise ValueError("must be a closed range 'START/END', e.g. 2024-01-01/2024-06-30")
    start, end = (pd.Timestamp(p) for p in parts)
    if start >= end:
        raise ValueError(f"start {parts[0]} is not before end {parts[1]}")
    return value


#: Earth Engine's cap on one image:computePixels request (48 MiB).
EE_REQUEST_BYTES = 48 * 2**20


class EarthEngineMaskSpec(_Model):
    """A per-image mask applied server-side before pixels leave Earth Engine.

    Pixels are dropped where ``band`` holds one of ``classes`` (e.g. Sentinel-2 SCL 3, 8, 9, 10), has
    any of ``bits`` set (e.g. QA60 bits 10, 11), or is below ``min`` (e.g. Cloud Score+ ``cs_cdf``
    0.6). ``collection`` names a collection to take ``band`` from, matched by ``system:index``.
    """

    band: str
    classes: list[int] | None = None
    bits: list[int] | None = None
    min: float | None = None
    collection: str | None = None

    @model_validator(mode="after")
    def _one_rule(self) -> EarthEngineMaskSpec:
        if sum(v is not None for v in (self.classes, self.bits, self.min)) != 1:
            raise ValueError("give exactly one of `classes`, `bits` or `min`")
        return self


class EarthEngineCompositeSpec(_Model):
    """Server-side compositing: one image per ``period`` (a frequency like MS or QS) reduced in Earth Engine."""

    period: str
    reducer: Literal["median", "mean", "min", "max", "mosaic"] = "median"

    @field_validator("period")
    @classmethod
    def _frequency(cls, value: str) -> str:
        try:
            pd.tseries.frequencies.to_offset(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a frequency such as 'MS' or 'QS'") from None
        return value


class EarthEngineCollectionSpec(CollectionSpec):
    """An Earth Engine ImageCollection (``id``), its bands, and the server-side query around it.

    ``filters`` maps an image property to operators (``eq, neq, lt, lte, gt, gte, in``);
    ``python: module:function`` names a function mapping ``ee.ImageCollection`` to
    ``ee.ImageCollection``, applied after filters and mask and before compositing; it must keep
    ``system:index`` and ``system:time_start``, as ``ImageCollection.map`` does.
    """

    filters: dict[str, dict[Literal["eq", "neq", "lt", "lte", "gt", "gte", "in"], Any]] = Field(default_factory=dict)
    mask: EarthEngineMaskSpec | None = None
    composite: EarthEngineCompositeSpec | None = None
    python: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$")


class EarthEngineSourceSpec(_Model):
    """Images from Google Earth Engine, computed server-side onto each chip's grid.

    ``credentials`` is ``default`` (application-default credentials, else the ones of
    ``earthengine authenticate``), a path to a service-account key file, or ``none`` (a local
    test server). ``project`` falls back to $EE_PROJECT or $GOOGLE_CLOUD_PROJECT.
    ``max_concurrency`` bounds the computePixels requests in flight per project across the cluster.
    """

    kind: Literal["earthengine"]
    url: str = "https://earthengine.googleapis.com"
    collections: list[EarthEngineCollectionSpec] = Field(min_length=1)
    aoi: AoiSpec
    datetime: str
    project: str | None = None
    credentials: str = "default"
    max_items: int = Field(5_000, gt=0)
    max_concurrency: int = Field(8, gt=0)
    request_bytes: int = Field(EE_REQUEST_BYTES, gt=0, le=EE_REQUEST_BYTES)
    request_retries: int = Field(5, ge=0)
    backoff: float = Field(1.0, ge=0)

    _closed = field_validator("datetime")(_closed_range)
    _unique_keys = model_validator(mode="after")(SourceSpec._unique_keys)
    time_range = SourceSpec.time_range


def _source_kind(value: Any) -> str:
    kind = value.get("kind", "stac") if isinstance(value, dict) else getattr(value, "kind", "stac")
    return kind if kind in ("stac", "earthengine") else "stac"


class GridSpec(_Model):
    """The fixed global grid: cell edge and pixel size in metres."""

    cell_size: float = Field(gt=0)
    pixel_size: float = Field(gt=0)

    @model_validator(mode="after")
    def _whole_pixels(self) -> GridSpec:
        n = self.cell_size / self.pixel_size
        if abs(n - round(n)) > 1e-9:
            raise ValueError(f"cell_size {self.cell_size} is not a multiple of pixel_size {self.pixel_size}")
        return self


class TimeSpec(_Model):
    """How the time axis of a chip is built.

    ``scenes`` keeps every acquisition day (at most ``max_scenes``, the length of the time axis);
    ``composite`` reduces each ``period`` to the median of its clear pixels.
    """

    mode: Literal["scenes", "composite"] = "scenes"
    window: str | None = None
    period: str | None = None
    max_scenes: int = Field(16, gt=0)

    @field_validator("window", "period")
    @classmethod
    def _frequency(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                pd.tseries.frequencies.to_offset(value)
            except ValueError:
                raise ValueError(f"{value!r} is not a frequency such as '30D', 'MS' or 'QS'") from None
        return value

    @model_validator(mode="after")
    def _period_for_composites(self) -> TimeSpec:
        if self.mode == "composite" and self.period is None:
            raise ValueError("mode 'composite' needs `period`, e.g. period: MS")
        return self


class LoaderSpec(_Model):
    """How pixels are read inside a chip task, and what happens when reads fail."""

    engine: Literal["odc-stac", "stackstac", "rasterio", "earthengine"] = "odc-stac"
    resampling: str = "nearest"
    retries: int = Field(3, ge=0)
    backoff: float = Field(0.5, ge=0)
    on_error: Literal["skip", "fail"] = "skip"


class OutputSpec(_Model):
    """Where the chips go: a directory holding chips.zarr, index.parquet and a STAC catalog.

    ``format: taco`` also packs the written chips into ``.tacozip`` shards of about
    ``taco_shard_size`` under ``taco/``; the Zarr store stays the source they are made from.
    ``direct_io`` writes whole shards of a local store past the page cache (`eoprep.sinks._direct`):
    less CPU per byte, but each write waits for the device; turn it off on a slow disk.
    """

    path: str
    chips_per_shard: int = Field(8, gt=0)
    codec: dict[str, Any] | None = None
    format: Literal["zarr", "taco"] = "zarr"
    taco_shard_size: str = Field("512MB", pattern=r"^[0-9]+(\.[0-9]+)?(B|KB|MB|GB|TB)$")
    direct_io: bool = True


class QualitySpec(_Model):
    """Which pixels are unusable (SCL classes, QA_PIXEL bit numbers) and which chips to drop.

    ``exclude`` flags are left out of composites and shift estimation; ``cloud`` flags make the
    chip's cloud fraction. A chip whose cloud fraction exceeds ``max_cloud`` or whose valid fraction
    is below ``min_valid`` in any of ``collections`` (default: all) is skipped, with the reason.
    """

    mask_bands: dict[str, Literal["scl", "qa_pixel"]] = Field(
        default_factory=lambda: {"SCL": "scl", "scl": "scl", "QA_PIXEL": "qa_pixel", "qa_pixel": "qa_pixel"}
    )
    scl: dict[str, list[int]] = Field(
        default_factory=lambda: {"nodata": [0], "saturated": [1], "shadow": [3], "cloud": [8, 9, 10], "snow": [11]}
    )
    qa_pixel: dict[str, list[int]] = Field(
        default_factory=lambda: {"nodata": [0], "cloud": [1, 2, 3], "shadow": [4], "snow": [5]}
    )
    exclude: list[str] = Field(default_factory=lambda: ["cloud", "shadow"])
    cloud: list[str] = Field(default_factory=lambda: ["cloud"])
    max_cloud: float | None = Field(None, ge=0, le=1)
    min_valid: float | None = Field(None, ge=0, le=1)
    collections: list[str] | None = None

    @model_validator(mode="after")
    def _known_flags(self) -> QualitySpec:
        known = set(self.scl) | set(self.qa_pixel)
        unknown = sorted(set(self.exclude + self.cloud) - known)
        if unknown:
            raise ValueError(f"flags {unknown} are defined in neither `scl` nor `qa_pixel` ({sorted(known)})")
        bad_bits = [b for bits in self.qa_pixel.values() for b in bits if not 0 <= b < 16]
        if bad_bits:
            raise ValueError(f"qa_pixel bit numbers must be 0-15, got {bad_bits}")
        return self


class AlignSpec(_Model):
    """Sub-pixel co-registration of every scene against the clearest scene of ``reference``.

    ``bands`` names, per collection key, the structure-rich bands to compare (default: all but the
    quality band); ``collections`` limits which collections are co-registered (default: all);
    ``sar`` names SAR collections (default: those with vv/vh/hh/hv bands). ``max_shift`` is in chip
    pixels; a scene below ``min_confidence`` keeps its estimate in the output but is not corrected.
    """

    reference: str
    bands: dict[str, list[str]] = Field(default_factory=dict)
    collections: list[str] | None = None
    method: Literal["gradient", "intensity"] = "gradient"
    max_shift: float = Field(5.0, gt=0, le=64)
    min_confidence: float = Field(0.05, ge=0, le=1)
    resampling: Literal["spline", "bilinear", "fourier"] = "spline"
    sar: list[str] | None = None


class PipelineSpec(_Model):
    """A whole pipeline: source → grid → time → loader → align/quality → output."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    source: Annotated[
        Annotated[SourceSpec, Tag("stac")] | Annotated[EarthEngineSourceSpec, Tag("earthengine")],
        Discriminator(_source_kind),
    ]
    grid: GridSpec
    time: TimeSpec = TimeSpec()
    loader: LoaderSpec = LoaderSpec()
    align: AlignSpec | None = None
    quality: QualitySpec = QualitySpec()
    output: OutputSpec

    @model_validator(mode="after")
    def _names_are_collections(self) -> PipelineSpec:
        bands = {c.key: c.bands for c in self.source.collections}
        used = {"quality.collections": self.quality.collections or []}
        if self.align is not None:
            used |= {
                "align.reference": [self.align.reference],
                "align.bands": list(self.align.bands),
                "align.collections": self.align.collections or [],
                "align.sar": self.align.sar or [],
            }
            for key, wanted in self.align.bands.items():
                missing = sorted(set(wanted) - set(bands.get(key, wanted)))
                if missing:
                    raise ValueError(f"align.bands.{key}: {missing} are not bands of collection {key!r}")
        for where, names in used.items():
            unknown = sorted(set(names) - set(bands))
            if unknown:
                raise ValueError(f"{where}: {unknown} are not collection names; use one of {sorted(bands)}")
        matched = [c.key for c in self.source.collections if c.match_tolerance is not None]
        if matched and len(matched) == len(bands):
            raise ValueError("match_tolerance: one collection must keep its own dates for the others to match")
        return self

    def spec_hash(self) -> str:
        """Stable hash of the validated spec, recorded in outputs for provenance."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def windows(self) -> list[tuple[pd.Timestamp, pd.Timestamp]]:
        """Time windows of the chips: the whole range, or consecutive ``time.window`` pieces."""
        return split_range(*self.source.time_range, self.time.window)


def split_range(start: pd.Timestamp, end: pd.Timestamp, freq: str | None) -> list[tuple[pd.Timestamp, pd.Timestamp]]:
    """Cut [start, end] into consecutive half-open pieces at ``freq`` boundaries (the last is closed)."""
    if freq is None:
        return [(start, end)]
    edges = [start, *(t for t in pd.date_range(start, end, freq=freq) if start < t <= end), end]
    edges = sorted(set(edges))
    return [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _resolve_paths(spec: PipelineSpec, base: Path) -> PipelineSpec:
    """Read input files named in the spec from its folder; outputs stay relative to the working directory."""
    aoi = spec.source.aoi
    if aoi.geojson is None or aoi.geojson.is_absolute():
        return spec
    aoi = aoi.model_copy(update={"geojson": (base / aoi.geojson).resolve()})
    return spec.model_copy(update={"source": spec.source.model_copy(update={"aoi": aoi})})


def parse_spec(data: Mapping[str, Any], *, origin: str = "<spec>", base: Path | None = None) -> PipelineSpec:
    """Validate a spec mapping; the error names ``origin`` and the failing key path."""
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as exc:
        raise spec_error(exc, origin, drop=lambda loc: len(loc) > 1 and loc[0] == "source") from None
    if spec.output.codec is not None:
        _validate_codec(spec.output.codec, origin)
    return _resolve_paths(spec, base) if base is not None else spec


def _validate_codec(codec: Mapping[str, Any], origin: str) -> None:
    from eoprep.codecs import CodecSpec

    try:
        CodecSpec.model_validate(codec)
    except ValidationError as exc:
        raise spec_error(exc, origin, prefix=("output", "codec")) from None


def spec_error(
    exc: ValidationError,
    origin: str,
    *,
    prefix: tuple[str, ...] = (),
    drop: Callable[[tuple[Any, ...]], bool] | None = None,
) -> SpecError:
    """One line from pydantic's errors: the file, the dotted key path of the first error, its message.

    ``drop`` says when the second path element is a union tag (``source.stac.aoi``) to leave out.
    """
    first = exc.errors()[0]
    loc = tuple(first["loc"])
    if drop is not None and drop(loc):
        loc = loc[:1] + loc[2:]
    where = ".".join(str(p) for p in (*prefix, *loc)) or "<root>"
    message = first["msg"].removeprefix("Value error, ")
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return SpecError(f"{origin}: {where}: {message}{more}")


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping; unreadable files and syntax errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read spec: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise SpecError(f"{path}:{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: {what} must be a YAML mapping, got {type(data).__name__}")
    return data


def load_spec(path: str | Path) -> PipelineSpec:
    """Read and validate a YAML pipeline spec; relative paths inside it are taken from its folder."""
    data = read_yaml_mapping(path, "a pipeline spec")
    return parse_spec(data, origin=str(path), base=Path(path).parent.resolve())
