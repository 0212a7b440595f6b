"""Embed specs: which chips to encode, with which encoder, on which device, into which feature store."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from eoprep.config import read_yaml_mapping, spec_error
from eoprep.errors import SpecError

__all__ = [
    "EmbedSpec",
    "EncoderSpec",
    "InputSpec",
    "MaskSpec",
    "RuntimeSpec",
    "StoreSpec",
    "load_embed_spec",
    "parse_embed_spec",
]


def is_remote(location: str) -> bool:
    """A checkpoint given as a URL (http(s) or any fsspec protocol) rather than a local path."""
    scheme = location.split("://", 1)[0] if "://" in location else ""
    return scheme not in ("", "file")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MaskSpec(_Model):
    """A class band whose listed values mark pixels to leave out of the temporal composite (e.g. SCL clouds)."""

    band: str
    invalid: list[int] = Field(min_length=1)


class InputSpec(_Model):
    """Chips to encode: an ``eoprep run`` output directory and one of its collection groups."""

    path: str
    group: str
    bands: list[str] | None = Field(None, min_length=1)
    mask: MaskSpec | None = None
    time_reduce: Literal["mean", "median"] = "mean"


class EncoderSpec(_Model):
    """The encoder: a registered name, its parameters and, for foundation models, a local checkpoint."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None
    band_map: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from eoprep.embed._registry import ENCODERS

        if name not in ENCODERS:
            raise ValueError(f"unknown encoder {name!r}; choose one of {sorted(ENCODERS)}")
        return name


class RuntimeSpec(_Model):
    """How the encoder runs: device, batch size, precision and how many chips one Dask task takes."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    precision: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    chips_per_task: int | Literal["auto"] = "auto"
    read_threads: int | Literal["auto"] = "auto"

    @field_validator("batch_size", "chips_per_task", "read_threads")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value <= 0:
            raise ValueError("must be a positive integer or 'auto'")
        return value


class StoreSpec(_Model):
    """Where the feature store goes and how its vectors are stored."""

    path: str
    dtype: Literal["float32", "float16"] = "float32"
    ann_threshold: int = Field(50_000, gt=0)


class EmbedSpec(_Model):
    """A whole embedding run: input chips → encoder → feature store."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    input: InputSpec
    encoder: EncoderSpec
    runtime: RuntimeSpec = RuntimeSpec()
    output: StoreSpec

    def spec_hash(self) -> str:
        """Hash of what determines the vectors (input selection and encoder), not of where or how fast.

        Rows appended by later runs must come from the same hash, so it leaves out paths and runtime.
        """
        payload = {
            "group": self.input.group,
            "bands": self.input.bands,
            "mask": self.input.mask.model_dump() if self.input.mask else None,
            "time_reduce": self.input.time_reduce,
            "encoder": self.encoder.model_dump(exclude={"checkpoint"}),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def parse_embed_spec(data: Mapping[str, Any], *, origin: str = "<spec>", base: Path | None = None) -> EmbedSpec:
    """Validate an embed spec mapping; the error names ``origin`` and the failing key path.

    Parameters
    ----------
    data : mapping
        The spec, as loaded from YAML.
    origin : str
        Name of the file (or other source) for error messages.
    base : Path, optional
        Folder that a relative ``encoder.checkpoint`` is taken from.

    Returns
    -------
    EmbedSpec
        The validated spec.

    Raises
    ------
    SpecError
        ``"{origin}: {key.path}: {what is wrong}"``.
    """
    try:
        spec = EmbedSpec.model_validate(data)
    except ValidationError as exc:
        raise spec_error(exc, origin) from None
    ckpt = spec.encoder.checkpoint
    if ckpt is not None and not is_remote(ckpt):
        path = Path(ckpt.removeprefix("file://"))
        if base is not None and not path.is_absolute():
            path = (base / path).resolve()
        if not path.is_file():
            raise SpecError(f"{origin}: encoder.checkpoint: {path} does not exist or is not a file")
        spec = spec.model_copy(update={"encoder": spec.encoder.model_copy(update={"checkpoint": str(path)})})
    return spec


def load_embed_spec(path: str | Path) -> EmbedSpec:
    """Read and validate a YAML embed spec; a relative checkpoint path is taken from the spec's folder.

    Parameters
    ----------
    path : str or Path
        The YAML file.

    Returns
    -------
    EmbedSpec
        The validated spec.
    """
    data = read_yaml_mapping(path, "an embed spec")
    return parse_embed_spec(data, origin=str(path), base=Path(path).parent.resolve())
