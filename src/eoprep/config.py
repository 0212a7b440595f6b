"""Pipeline specs: YAML files validated into typed models, with errors that name the file and key."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from eoprep.errors import SpecError

__all__ = [
    "AoiSpec",
    "CollectionSpec",
    "GridSpec",
    "LoaderSpec",
    "OutputSpec",
    "PipelineSpec",
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

    @field_validator("datetime")
    @classmethod
    def _closed_range(cls, value: str) -> str:
        parts = value.split("/")
        if len(parts) != 2 or ".." in parts or "" in parts:
            raise ValueError("must be a closed range 'START/END', e.g. 2024-01-01/2024-06-30")
        start, end = (pd.Timestamp(p) for p in parts)
        if start >= end:
            raise ValueError(f"start {parts[0]} is not before end {parts[1]}")
        return value

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

    engine: Literal["odc-stac", "stackstac", "rasterio"] = "odc-stac"
    resampling: str = "nearest"
    retries: int = Field(3, ge=0)
    backoff: float = Field(0.5, ge=0)
    on_error: Literal["skip", "fail"] = "skip"


class OutputSpec(_Model):
    """Where the chips go: a directory holding chips.zarr, index.parquet and a STAC catalog."""

    path: str
    chips_per_shard: int = Field(8, gt=0)
    codec: dict[str, Any] | None = None


class PipelineSpec(_Model):
    """A whole pipeline: source → grid → time → loader → output."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    source: SourceSpec
    grid: GridSpec
    time: TimeSpec = TimeSpec()
    loader: LoaderSpec = LoaderSpec()
    output: OutputSpec

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
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        message = first["msg"].removeprefix("Value error, ")
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise SpecError(f"{origin}: {where}: {message}{more}") from None
    if spec.output.codec is not None:
        _validate_codec(spec.output.codec, origin)
    return _resolve_paths(spec, base) if base is not None else spec


def _validate_codec(codec: Mapping[str, Any], origin: str) -> None:
    from eoprep.codecs import CodecSpec

    try:
        CodecSpec.model_validate(codec)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(["output", "codec", *(str(p) for p in first["loc"])])
        raise SpecError(f"{origin}: {where}: {first['msg'].removeprefix('Value error, ')}") from None


def load_spec(path: str | Path) -> PipelineSpec:
    """Read and validate a YAML pipeline spec; relative paths inside it are taken from its folder."""
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
        raise SpecError(f"{path}: a pipeline spec must be a YAML mapping, got {type(data).__name__}")
    return parse_spec(data, origin=str(path), base=path.parent.resolve())
