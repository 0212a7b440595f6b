"""Rate–distortion metrics for decoded chips, computed on valid pixels only.

PSNR comes two ways: with the dtype's full-scale peak (xarrayvideo's convention, 65535 for uint16, which
inflates figures for data using a fraction of that range) and with the reference's data range (the
honest one, and the one rate control targets).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from scipy.ndimage import uniform_filter

__all__ = ["bpppb", "max_abs_error", "psnr", "spectral_angle", "ssim", "throughput_mbps", "valid_mask"]


def valid_mask(reference: np.ndarray, nodata: float | None = None) -> np.ndarray:
    """Pixels that carry data: not NaN and not ``nodata``."""
    ref = np.asarray(reference)
    valid = np.isfinite(ref) if ref.dtype.kind == "f" else np.ones(ref.shape, dtype=bool)
    if nodata is not None:
        valid &= ref != nodata
    return valid


def _peak(reference: np.ndarray, valid: np.ndarray, peak: Literal["dtype", "range"] | float) -> float:
    if not isinstance(peak, str):
        return float(peak)
    if peak == "dtype" and reference.dtype.kind in "ui":
        info = np.iinfo(reference.dtype)
        return float(info.max) if info.min == 0 else float(info.max) - float(info.min)
    values = reference[valid]
    return float(values.max() - values.min()) if values.size else 0.0


def psnr(
    reference: np.ndarray,
    decoded: np.ndarray,
    *,
    peak: Literal["dtype", "range"] | float = "range",
    nodata: float | None = None,
) -> float:
    """Peak signal-to-noise ratio in dB over all valid values of a cube.

    Parameters
    ----------
    reference, decoded
        Arrays of equal shape.
    peak
        ``"range"``: max − min of the valid reference (honest); ``"dtype"``: the dtype's full scale
        (65535 for uint16, as xarrayvideo reports; float data fall back to the range); or a number.
    nodata
        Reference value excluded from the comparison (NaNs are always excluded).

    Returns
    -------
    float
        PSNR in dB; ``inf`` for an exact match.
    """
    ref = np.asarray(reference)
    valid = valid_mask(ref, nodata)
    diff = ref[valid].astype(np.float64) - np.asarray(decoded)[valid].astype(np.float64)
    mse = float(np.mean(diff * diff)) if diff.size else 0.0
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(_peak(ref, valid, peak) ** 2 / mse)


def max_abs_error(reference: np.ndarray, decoded: np.ndarray, *, nodata: float | None = None) -> float:
    """Largest absolute difference over valid values (the bound LERC promises)."""
    ref = np.asarray(reference)
    valid = valid_mask(ref, nodata)
    if not valid.any():
        return 0.0
    return float(np.max(np.abs(ref[valid].astype(np.float64) - np.asarray(decoded)[valid].astype(np.float64))))


def ssim(
    reference: np.ndarray, decoded: np.ndarray, *, data_range: float | None = None, nodata: float | None = None
) -> float:
    """Mean structural similarity over the (y, x) planes, 7×7 uniform window (Wang et al. 2004 constants).

    Invalid pixels are set to the plane's valid mean in both arrays so they neither help nor hurt.
    """
    ref = np.asarray(reference, dtype=np.float64)
    dec = np.asarray(decoded, dtype=np.float64)
    valid = valid_mask(np.asarray(reference), nodata)
    if data_range is None:
        data_range = _peak(np.asarray(reference), valid, "range") or 1.0
    ref2 = ref.reshape(-1, *ref.shape[-2:]).copy()
    dec2 = dec.reshape(-1, *dec.shape[-2:]).copy()
    val2 = valid.reshape(-1, *valid.shape[-2:])
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    scores = []
    for r, d, v in zip(ref2, dec2, val2, strict=True):
        if not v.any():
            continue
        fill = r[v].mean()
        r[~v], d[~v] = fill, fill
        mu_r, mu_d = uniform_filter(r, 7), uniform_filter(d, 7)
        var_r = uniform_filter(r * r, 7) - mu_r**2
        var_d = uniform_filter(d * d, 7) - mu_d**2
        cov = uniform_filter(r * d, 7) - mu_r * mu_d
        s = ((2 * mu_r * mu_d + c1) * (2 * cov + c2)) / ((mu_r**2 + mu_d**2 + c1) * (var_r + var_d + c2))
        scores.append(float(s[v].mean()))
    return float(np.mean(scores)) if scores else 1.0


def spectral_angle(reference: np.ndarray, decoded: np.ndarray, *, nodata: float | None = None) -> float:
    """Mean spectral angle (degrees) between reference and decoded band vectors of (…, band, y, x) cubes."""
    ref = np.moveaxis(np.asarray(reference, dtype=np.float64), -3, -1).reshape(-1, reference.shape[-3])
    dec = np.moveaxis(np.asarray(decoded, dtype=np.float64), -3, -1).reshape(-1, reference.shape[-3])
    valid = np.moveaxis(valid_mask(np.asarray(reference), nodata), -3, -1).reshape(ref.shape).all(axis=1)
    ref, dec = ref[valid], dec[valid]
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(dec, axis=1)
    keep = norms > 0
    if not keep.any():
        return 0.0
    cos = np.clip(np.sum(ref[keep] * dec[keep], axis=1) / norms[keep], -1.0, 1.0)
    return float(np.degrees(np.arccos(cos)).mean())


def bpppb(n_bytes: int, shape: tuple[int, ...]) -> float:
    """Bits per pixel per band: payload bits over the number of values in the chip (time × band × y × x)."""
    return 8.0 * n_bytes / float(np.prod(shape))


def throughput_mbps(n_bytes: int, seconds: float) -> float:
    """Uncompressed megabytes (1e6) per second."""
    return n_bytes / 1e6 / seconds if seconds > 0 else math.inf
