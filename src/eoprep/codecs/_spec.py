"""The codec part of a pipeline spec (`output.codec`), validated once so codecs can trust it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["CodecName", "CodecSpec", "LOSSLESS_ONLY", "VIDEO_CODECS", "IMAGE_CODECS"]

CodecName = Literal["zstd", "blosc2", "jpegxl", "jpeg2000", "htj2k", "lerc", "h264", "h265", "av1", "ffv1"]

LOSSLESS_ONLY = frozenset({"zstd", "blosc2", "ffv1"})
VIDEO_CODECS = frozenset({"h264", "h265", "av1", "ffv1"})
IMAGE_CODECS = frozenset({"jpegxl", "jpeg2000", "htj2k"})

# Bit depths each encoder accepts for the coded planes (what PyAV / imagecodecs support).
_BIT_DEPTHS: dict[str, tuple[int, ...]] = {
    "h264": (8, 10),
    "h265": (8, 10, 12),
    "av1": (8, 10),
    "ffv1": tuple(range(8, 17)),
    "jpegxl": tuple(range(8, 17)),
    "jpeg2000": tuple(range(8, 17)),
    "htj2k": tuple(range(8, 17)),
}
_LEVELS: dict[str, tuple[int, int, str]] = {
    "zstd": (1, 22, "zstd compression level"),
    "blosc2": (0, 9, "blosc2 compression level"),
    "jpegxl": (1, 9, "JPEG-XL encoder effort"),
    "lerc": (0, 0, "LERC has no level; use max_error"),
}


class CodecSpec(BaseModel):
    """How to encode chips: codec name plus one way to set quality.

    Exactly one of ``lossless``, ``quality``, ``target_bpppb``, ``target_psnr`` or ``max_error`` decides
    the rate; with none of them a lossy codec uses its default quality.

    Parameters
    ----------
    name
        Codec family: ``zstd``, ``blosc2``, ``jpegxl``, ``jpeg2000``, ``htj2k``, ``lerc``, ``h264``,
        ``h265``, ``av1`` or ``ffv1``.
    lossless
        Bit-exact round trip. Implied for ``zstd``, ``blosc2`` and ``ffv1``.
    quality
        Codec-native knob: CRF for h264/h265/av1, distance for JPEG-XL, target PSNR in dB (on the coded
        bit depth) for JPEG 2000, quantisation step for HTJ2K, max error for LERC.
    target_bpppb
        Search the quality knob for the best quality whose payload stays at or below this many bits per
        pixel per band.
    target_psnr
        Search for the smallest payload whose data-range PSNR (dB) reaches this value.
    max_error
        Maximum absolute error in data units (LERC only); 0 is lossless.
    bit_depth
        Bits per coded sample (video: 8/10/12 as the encoder allows; image codecs: 8–16).
    level
        Compression level (zstd, blosc2) or encoder effort (JPEG-XL).
    nodata
        Value marking missing pixels; kept exactly through a lossless mask, as is NaN.
    decorrelate
        Lossy only: rotate bands onto their principal components (KLT) before coding so correlated bands
        are not coded twice.
    preset
        Encoder speed preset for video codecs (x264/x265 names, or an SVT-AV1 number).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: CodecName
    lossless: bool = False
    quality: float | None = None
    target_bpppb: float | None = Field(default=None, gt=0)
    target_psnr: float | None = Field(default=None, gt=0)
    max_error: float | None = Field(default=None, ge=0)
    bit_depth: int | None = None
    level: int | None = None
    nodata: float | None = None
    decorrelate: bool = True
    preset: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _imply_lossless(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("name") in LOSSLESS_ONLY and "lossless" not in data:
            data = {**data, "lossless": True}
        return data

    @model_validator(mode="after")
    def _check(self) -> CodecSpec:
        knobs = [k for k in ("quality", "target_bpppb", "target_psnr", "max_error") if getattr(self, k) is not None]
        if len(knobs) > 1:
            raise ValueError(f"codec.{knobs[1]}: set only one of {', '.join(knobs)} for codec {self.name!r}")
        if self.name in LOSSLESS_ONLY and not self.lossless:
            raise ValueError(f"codec.lossless: {self.name} is lossless only; drop lossless: false")
        if self.lossless and knobs and self.name not in LOSSLESS_ONLY:
            raise ValueError(f"codec.{knobs[0]}: lossless {self.name} takes no {knobs[0]}; drop one of them")
        if self.lossless and knobs and self.name in LOSSLESS_ONLY:
            raise ValueError(f"codec.{knobs[0]}: {self.name} is lossless only and takes no {knobs[0]}")
        if self.max_error is not None and self.name != "lerc":
            raise ValueError(f"codec.max_error: only lerc bounds the error; {self.name} uses quality or targets")
        if self.lossless and self.name == "av1":
            raise ValueError("codec.lossless: SVT-AV1 has no lossless mode here; use ffv1 or h265")
        if self.bit_depth is not None:
            allowed = _BIT_DEPTHS.get(self.name)
            if allowed is None:
                raise ValueError(f"codec.bit_depth: {self.name} stores native values and takes no bit_depth")
            if self.bit_depth not in allowed:
                text = ", ".join(map(str, allowed)) if len(allowed) < 4 else f"{allowed[0]}–{allowed[-1]}"
                raise ValueError(f"codec.bit_depth: {self.name} supports bit depths {text}; got {self.bit_depth}")
        if self.level is not None:
            lo, hi, what = _LEVELS.get(self.name, (0, -1, f"{self.name} has no level"))
            if not lo <= self.level <= hi:
                raise ValueError(f"codec.level: {what}" + (f" is {lo}–{hi}, got {self.level}" if hi >= lo else ""))
        return self

    @property
    def coded_bit_depth(self) -> int:
        """Bits per coded sample, the codec's default where unset."""
        if self.bit_depth is not None:
            return self.bit_depth
        return {"h264": 10, "h265": 12, "av1": 10}.get(self.name, 16)
