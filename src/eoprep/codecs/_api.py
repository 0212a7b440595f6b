"""`encode_chip` / `decode_chip`: validation, masks, value mapping, rate control, payload framing."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ._base import SUPPORTED_DTYPES, Codec, CodecError, TunableCodec
from ._image import ImageCodec
from ._native import BytesCodec, LercCodec
from ._payload import pack_mask, pack_payload, unpack_mask, unpack_payload
from ._planes import PlaneMapping, fit_mapping, mapping_from_json
from ._spec import CodecSpec
from ._video import VideoCodec

_SEARCH_STEPS = 9


def get_codec(spec: CodecSpec) -> Codec:
    """Return the codec implementation for ``spec.name``.

    Parameters
    ----------
    spec
        A validated codec spec.

    Returns
    -------
    Codec
        The implementation of that codec family.
    """
    name = spec.name
    if name in ("zstd", "blosc2"):
        return BytesCodec(name)
    if name == "lerc":
        return LercCodec()
    if name in ("jpegxl", "jpeg2000", "htj2k"):
        return ImageCodec(name)
    return VideoCodec(name)


def _as_chip(array: np.ndarray) -> np.ndarray:
    arr = np.asarray(array)
    if arr.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise CodecError(f"chip dtype {arr.dtype} is not supported; use one of {names} (cast before encoding)")
    if arr.ndim < 4 or any(n != 1 for n in arr.shape[:-4]):
        raise CodecError(f"chip shape {arr.shape} is not (time, band, y, x) with optional leading singleton dims")
    if 0 in arr.shape:
        raise CodecError(f"chip shape {arr.shape} is empty")
    return arr.reshape(arr.shape[-4:])


def _invalid_masks(chip: np.ndarray, nodata: float | None) -> dict[str, np.ndarray]:
    masks = {}
    if chip.dtype.kind == "f":
        nan = np.isnan(chip)
        if nan.any():
            masks["nan"] = nan
    if nodata is not None and not math.isnan(nodata):
        hit = chip == np.asarray(nodata).astype(chip.dtype)
        if hit.any():
            masks["nodata"] = hit
    return masks


def _fill_invalid(chip: np.ndarray, invalid: np.ndarray) -> np.ndarray:
    """Replace invalid pixels by their band's valid mean so they cost the encoder almost nothing."""
    out = chip.astype(np.float64)
    for b in range(chip.shape[1]):
        bad = invalid[:, b]
        if bad.any():
            good = out[:, b][~bad]
            out[:, b][bad] = good.mean() if good.size else 0.0
    return out


def _masked(spec: CodecSpec) -> bool:
    """Lossless paths keep every value (nodata included) by construction; lossy ones and LERC need masks."""
    return (not spec.lossless) or spec.name == "lerc"


def _move_off_nodata(chip: np.ndarray, nodata: float) -> None:
    """Shift valid pixels that a lossy decode landed on ``nodata`` by one step, so they still read as data."""
    hit = chip == np.asarray(nodata).astype(chip.dtype)
    if not hit.any():
        return
    if chip.dtype.kind == "f":
        chip[hit] = np.nextafter(chip.dtype.type(nodata), chip.dtype.type(np.inf))
    else:
        chip[hit] = nodata + 1 if nodata < np.iinfo(chip.dtype).max else nodata - 1


def _restore(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Values back in the chip's dtype; float ``values`` bound for an integer dtype are rounded and clipped in place."""
    if values.dtype == dtype:
        return values
    if dtype.kind == "f":
        return values.astype(dtype, copy=False)
    info = np.iinfo(dtype)
    np.rint(values, out=values)
    np.clip(values, info.min, info.max, out=values)
    return values.astype(dtype)


def _encode_once(
    chip: np.ndarray, shape: tuple[int, ...], spec: CodecSpec, codec: Codec, knob: float | None, nodata: float | None
) -> bytes:
    masks = _invalid_masks(chip, nodata) if _masked(spec) else {}
    header: dict[str, Any] = {
        "codec": spec.model_dump(exclude_defaults=True),
        "dtype": chip.dtype.str,
        "shape": list(shape),
        "nodata": nodata,
        "knob": knob,
    }
    sections: dict[str, bytes] = {f"mask_{k}": pack_mask(m) for k, m in masks.items()}
    valid, values = None, chip
    if masks:
        invalid = np.logical_or.reduce(list(masks.values()))
        valid, values = ~invalid, _fill_invalid(chip, invalid)
    if codec.coded:
        bit_depth = spec.coded_bit_depth
        mapping = fit_mapping(
            values, valid, bit_depth, exact=spec.lossless, decorrelate=spec.decorrelate, codec=spec.name
        )
        header["mapping"] = mapping.to_json()
        params, data = codec.encode(mapping.to_codes(values, bit_depth), spec, knob)
    else:
        params, data = codec.encode(_restore(values, chip.dtype), spec, knob)
    header["params"] = params
    sections.update(data)
    return pack_payload(header, sections)


def _knob_at(space: tuple[float, float, bool, bool], u: float) -> float:
    best, worst, log, integer = space
    value = math.exp(math.log(best) + u * (math.log(worst) - math.log(best))) if log else best + u * (worst - best)
    return float(round(value)) if integer else value


def _search(
    chip: np.ndarray, shape: tuple[int, ...], spec: CodecSpec, codec: TunableCodec, nodata: float | None
) -> bytes:
    """Bisect the codec's quality knob for ``target_bpppb`` (best quality under it) or ``target_psnr``."""
    from .metrics import psnr

    finite = chip[np.isfinite(chip)] if chip.dtype.kind == "f" else chip
    span = float(finite.max() - finite.min()) if finite.size else 1.0
    space = codec.knob_space(max(span, 1e-12))
    n_values = chip.size

    def attempt(u: float) -> tuple[bytes, float, float]:
        payload = _encode_once(chip, shape, spec, codec, _knob_at(space, u), nodata)
        bpppb = 8 * len(payload) / n_values
        if spec.target_psnr is None:
            return payload, bpppb, math.nan
        decoded = decode_chip(payload).reshape(chip.shape)
        return payload, bpppb, psnr(chip, decoded, peak="range", nodata=nodata)

    if spec.target_bpppb is not None:
        target = spec.target_bpppb

        def ok(r: tuple[bytes, float, float]) -> bool:
            return r[1] <= target
    else:
        target = spec.target_psnr

        def ok(r: tuple[bytes, float, float]) -> bool:
            return r[2] >= target

    return _bisect(attempt, ok, spec, target)


def _bisect(attempt: Callable[[float], tuple[bytes, float, float]], ok, spec: CodecSpec, target: float) -> bytes:
    by_rate = spec.target_bpppb is not None
    lo_u, hi_u = 0.0, 1.0  # u=0 best quality, u=1 lowest rate
    best_q, worst_q = attempt(lo_u), attempt(hi_u)
    if by_rate and not ok(best_q) and not ok(worst_q):
        raise CodecError(
            f"target_bpppb={target:g} cannot be met by {spec.name}: its lowest rate on this chip is "
            f"{worst_q[1]:.4g} bpppb; raise target_bpppb or pick a codec that goes lower (h265, av1, jpegxl)"
        )
    if not by_rate and not ok(best_q):
        raise CodecError(
            f"target_psnr={target:g} dB cannot be met by {spec.name}: its best quality on this chip gives "
            f"{best_q[2]:.2f} dB; lower target_psnr, raise bit_depth, or use lossless: true"
        )
    good = best_q if by_rate and ok(best_q) else worst_q if not by_rate and ok(worst_q) else None
    if good is not None:
        return good[0]
    found = worst_q if by_rate else best_q
    for _ in range(_SEARCH_STEPS):
        mid = (lo_u + hi_u) / 2
        result = attempt(mid)
        if ok(result):
            found = result
            lo_u, hi_u = (lo_u, mid) if by_rate else (mid, hi_u)
        else:
            lo_u, hi_u = (mid, hi_u) if by_rate else (lo_u, mid)
    return found[0]


def encode_chip(array: np.ndarray, spec: CodecSpec, *, nodata: float | None = None) -> bytes:
    """Encode one chip into a self-describing, checksummed payload.

    Parameters
    ----------
    array
        Chip values shaped (time, band, y, x), optionally with leading singleton dims; uint8, uint16,
        int16 or float32.
    spec
        Codec and quality settings.
    nodata
        Missing-value marker (defaults to ``spec.nodata``); those pixels and NaNs come back exactly.

    Returns
    -------
    bytes
        The payload; `decode_chip` needs nothing else.

    Raises
    ------
    CodecError
        Unsupported dtype or shape, values that do not fit a lossless bit depth, or an unreachable target.
    """
    if not isinstance(spec, CodecSpec):
        spec = CodecSpec.model_validate(spec)
    original = np.asarray(array)
    chip = _as_chip(original)
    nodata = spec.nodata if nodata is None else nodata
    codec = get_codec(spec)
    if isinstance(codec, TunableCodec) and (spec.target_bpppb is not None or spec.target_psnr is not None):
        return _search(chip, original.shape, spec, codec, nodata)
    knob = spec.max_error if spec.name == "lerc" else spec.quality
    if knob is None and not spec.lossless and isinstance(codec, TunableCodec):
        knob = codec.default_knob()
    return _encode_once(chip, original.shape, spec, codec, knob, nodata)


def decode_chip(payload: bytes | bytearray | memoryview) -> np.ndarray:
    """Decode a payload written by `encode_chip`.

    Parameters
    ----------
    payload
        The bytes of one chip.

    Returns
    -------
    numpy.ndarray
        The chip with its original dtype and shape; nodata and NaN pixels restored exactly.

    Raises
    ------
    CodecError
        Corrupt or truncated payload (checksum), unknown format version, or a missing decoder.
    """
    header, sections = unpack_payload(payload)
    spec = CodecSpec.model_validate(header["codec"])
    codec = get_codec(spec)
    dtype = np.dtype(header["dtype"])
    shape = tuple(header["shape"])
    chip_shape = shape[-4:]
    if codec.coded:
        mapping: PlaneMapping = mapping_from_json(header["mapping"])
        codes_shape = (chip_shape[0], len(mapping.offset), *chip_shape[2:])
        codes = codec.decode(header["params"], sections, codes_shape)
        chip = _restore(mapping.from_codes(codes), dtype)
    else:
        raw = codec.decode(header["params"], sections, chip_shape)
        if raw.dtype == np.uint8 and dtype != raw.dtype:
            raw = raw.view(dtype.newbyteorder("<"))
        chip = raw.astype(dtype, copy=False).reshape(chip_shape)
    nodata = header["nodata"]
    if _masked(spec) and nodata is not None and not math.isnan(nodata):
        _move_off_nodata(chip, nodata)
    if "mask_nodata" in sections:
        chip[unpack_mask(sections["mask_nodata"], chip_shape)] = nodata
    if "mask_nan" in sections:
        chip[unpack_mask(sections["mask_nan"], chip_shape)] = np.nan
    return chip.reshape(shape)
