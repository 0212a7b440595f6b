"""Co-register every scene of a chip against one reference scene, and correct what can be trusted.

The reference is the clearest scene of the reference collection; every other scene of every
collection taking part (other dates of the reference sensor included) is estimated against it,
on clear pixels only, and moved back by sub-pixel resampling when the confidence is high enough.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from scipy import ndimage

from eoprep.align._estimate import Modality, ShiftEstimate, estimate_shift

if TYPE_CHECKING:
    from eoprep.chips import CollectionLayout

__all__ = ["AlignRole", "SceneShift", "apply_shift", "coregister_chip"]

Resampling = Literal["spline", "bilinear", "nearest", "fourier"]
_ORDER = {"spline": 3, "bilinear": 1, "nearest": 0}
#: Pixels added around unusable (cloud, shadow) pixels: their edges are sharp and belong to no sensor.
_DILATE = 2


@dataclass(frozen=True)
class AlignRole:
    """How one collection takes part in co-registration (built from the spec's ``align`` section)."""

    reference: bool
    bands: tuple[str, ...]
    modality: Modality
    method: str = "gradient"
    max_shift: float = 5.0
    min_confidence: float = 0.05
    resampling: Resampling = "spline"


@dataclass(frozen=True)
class SceneShift:
    """The estimated shift of one scene in pixels (east, north), its confidence and whether it was corrected."""

    dx: float
    dy: float
    confidence: float
    applied: bool


def apply_shift(
    image: np.ndarray,
    dx: float,
    dy: float,
    *,
    valid: np.ndarray | None = None,
    method: Resampling = "spline",
) -> tuple[np.ndarray, np.ndarray]:
    """Move an image's content by ``(-dx, -dy)`` pixels (east, north): undo an estimated shift.

    Parameters
    ----------
    image
        2-D array.
    dx, dy
        The shift to undo, in pixels, positive east and north (as in `ShiftEstimate`).
    valid
        Pixels with data; invalid pixels never leak into valid ones.
    method
        ``"spline"`` (cubic), ``"bilinear"``, ``"nearest"`` (class layers) or ``"fourier"``.

    Returns
    -------
    data, valid
        Float64 data and the mask of pixels fully made of valid input (others are to be nodata).
    """
    ok = np.ones(image.shape, bool) if valid is None else valid
    back = (dy, -dx)
    data = image.astype(np.float64)
    fill = float(np.median(data[ok])) if ok.any() else 0.0
    data = np.where(ok, data, fill)
    if method == "fourier":
        moved = np.fft.ifft2(ndimage.fourier_shift(np.fft.fft2(data), back)).real
    else:
        moved = ndimage.shift(data, back, order=_ORDER[method], mode="nearest")
    if method == "nearest":
        keep = ndimage.shift(ok.astype(np.uint8), back, order=0, mode="constant", cval=0) > 0
    else:
        keep = ndimage.shift(ok.astype(np.float64), back, order=1, mode="constant", cval=0.0) > 0.999
    return moved, keep


def _invalid(data: np.ndarray, nodata: float) -> np.ndarray:
    return np.isnan(data) if np.isnan(nodata) else data == nodata


def _clear(scene: np.ndarray, layout: CollectionLayout, role: AlignRole) -> np.ndarray:
    """Pixels usable for estimation: data in every band used, not flagged cloud/shadow (dilated)."""
    idx = [layout.bands.index(b) for b in role.bands]
    ok = ~_invalid(scene[idx], layout.nodata).any(axis=0)
    rule = layout.quality.mask if layout.quality is not None else None
    if rule is not None:
        bad = rule.unusable(scene[layout.bands.index(rule.band)])
        ok &= ~ndimage.binary_dilation(bad, iterations=_DILATE)
    return ok


def _correct(scene: np.ndarray, layout: CollectionLayout, shift: ShiftEstimate, method: Resampling) -> np.ndarray:
    """All bands of one scene moved back by ``shift``; class layers by nearest neighbour."""
    rule = layout.quality.mask if layout.quality is not None else None
    dtype = np.dtype(layout.dtype)
    out = np.empty_like(scene)
    for k, band in enumerate(layout.bands):
        plane = scene[k]
        valid = ~_invalid(plane, layout.nodata)
        how: Resampling = "nearest" if rule is not None and band == rule.band else method
        moved, keep = apply_shift(plane, shift.dx, shift.dy, valid=valid, method=how)
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            moved = np.clip(np.round(moved), info.min, info.max)
            # A valid value that rounds onto the fill value would silently become nodata.
            moved[keep & (moved == layout.nodata)] += 1 if layout.nodata < info.max else -1
        out[k] = np.where(keep, moved, layout.nodata).astype(dtype)
    return out


def coregister_chip(
    arrays: Mapping[str, np.ndarray], layouts: Mapping[str, CollectionLayout]
) -> tuple[dict[str, np.ndarray], dict[str, list[SceneShift | None]]]:
    """Estimate and correct the shift of every scene of a chip against the reference scene.

    Parameters
    ----------
    arrays
        Per collection key, the chip array (time, band, y, x) as built by `eoprep.chips.build_chip`.
    layouts
        Per collection key, its layout; collections whose ``align`` is None are left as they are.

    Returns
    -------
    arrays, shifts
        Corrected arrays (copies where something changed), and per collection key one entry per
        time step: a `SceneShift` in pixels, or None where the slot is empty or nothing was estimated.
        The reference scene gets a zero shift with confidence 1, not applied.
    """
    out = dict(arrays)
    shifts: dict[str, list[SceneShift | None]] = {
        key: [None] * arrays[key].shape[0] for key, layout in layouts.items() if layout.align is not None
    }
    ref_key = next((k for k in shifts if layouts[k].align.reference), None)  # type: ignore[union-attr]
    if ref_key is None:
        return out, shifts
    ref_layout, ref_role = layouts[ref_key], layouts[ref_key].align
    assert ref_role is not None
    ref_chip = arrays[ref_key]
    clear = [_clear(scene, ref_layout, ref_role) for scene in ref_chip]
    t_ref = int(np.argmax([c.mean() for c in clear]))
    if not clear[t_ref].any():
        return out, shifts
    ref_idx = [ref_layout.bands.index(b) for b in ref_role.bands]
    reference, reference_ok = ref_chip[t_ref][ref_idx], clear[t_ref]
    for key, entries in shifts.items():
        layout = layouts[key]
        role = layout.align
        assert role is not None
        chip = arrays[key]
        idx = [layout.bands.index(b) for b in role.bands]
        corrected = None
        for t, scene in enumerate(chip):
            if key == ref_key and t == t_ref:
                entries[t] = SceneShift(0.0, 0.0, 1.0, applied=False)
                continue
            ok = clear[t] if key == ref_key else _clear(scene, layout, role)
            if not ok.any():
                continue
            est = estimate_shift(
                reference,
                scene[idx],
                reference_valid=reference_ok,
                moving_valid=ok,
                modalities=(ref_role.modality, role.modality),
                method=role.method,
                max_shift=role.max_shift,
            )
            applied = est.confidence >= role.min_confidence
            entries[t] = SceneShift(est.dx, est.dy, est.confidence, applied)
            if applied:
                corrected = chip.copy() if corrected is None else corrected
                corrected[t] = _correct(scene, layout, est, role.resampling)
        if corrected is not None:
            out[key] = corrected
    return out, shifts
