"""Sub-pixel shift estimation between two images of one chip grid, of the same or different sensors.

Intensities do not compare across sensors (a field bright in NIR is dark in SAR, edges change polarity),
but the *orientation* of edges does. The default estimator therefore correlates doubled-angle gradient
orientation fields (polarity-free), weighted by a saturating gradient magnitude, with a masked
normalised cross-correlation (Padfield 2012) so clouds, nodata and chip edges never enter the score.
The integer peak is refined by re-estimating after a sub-pixel resample of the moving image, which
removes the bias of peak interpolation and of the apodisation window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
from scipy import fft, ndimage
from scipy.signal.windows import tukey

__all__ = [
    "GradientOrientation",
    "IntensityCorrelation",
    "Modality",
    "ShiftEstimate",
    "ShiftEstimator",
    "estimate_shift",
    "estimator",
]

Modality = Literal["optical", "sar"]

#: Smoothing (pixels) before gradients: SAR speckle needs more than optical noise.
_SIGMA: dict[str, float] = {"optical": 1.0, "sar": 1.5}
#: Least fraction of the chip both images must share at the peak, below which nothing is trusted.
_MIN_OVERLAP = 0.25
#: Radius (pixels) around the peak excluded when looking for the best rival peak.
_EXCLUDE = 3
#: Extra search radius (pixels) beyond ``max_shift`` where rival peaks are looked for.
_MARGIN = 4


@dataclass(frozen=True)
class ShiftEstimate:
    """Where the moving image's content sits relative to the reference.

    ``dx`` is positive east (columns), ``dy`` positive north (up), both in pixels; correcting means
    moving the content by ``(-dx, -dy)``. ``confidence`` is the margin by which the best match beats
    the best rival match (normalised correlation units, 0 = ambiguous); ``correlation`` is the peak's
    normalised correlation and ``overlap`` the fraction of the chip both images share. When the
    images share too little to compare, the shift is NaN and the confidence 0.
    """

    dx: float
    dy: float
    confidence: float
    correlation: float
    overlap: float

    @property
    def rows_cols(self) -> tuple[float, float]:
        """The shift as (rows down, columns right), the order array functions take."""
        return -self.dy, self.dx


class ShiftEstimator(Protocol):
    """Turns an image into a field whose correlation peaks where two sensors' images line up."""

    name: str

    def field(self, image: np.ndarray, valid: np.ndarray, modality: Modality) -> tuple[np.ndarray, np.ndarray]:
        """The field (real or complex, 0 outside) and the pixels where it is defined."""
        ...


def _prepare(image: np.ndarray, valid: np.ndarray, modality: Modality) -> tuple[np.ndarray, np.ndarray]:
    """Float image and mask; SAR goes to log scale so multiplicative speckle becomes additive noise."""
    img = image.astype(np.float64)
    ok = valid & np.isfinite(img)
    if modality == "sar":
        ok &= img > 0
        img = np.log(np.where(ok, img, 1.0))
    sigma = _SIGMA[modality]
    weight = ndimage.gaussian_filter(ok.astype(np.float64), sigma)
    smooth = ndimage.gaussian_filter(np.where(ok, img, 0.0), sigma) / np.maximum(weight, 1e-6)
    # Smoothing and differences reach ~2 px across a mask edge; those pixels carry invented structure.
    core = ndimage.binary_erosion(ok, iterations=2, border_value=0)
    return smooth, core


@dataclass(frozen=True)
class GradientOrientation:
    """Doubled-angle gradient orientation, weighted by m² / (m² + q75²) of the gradient magnitude m.

    The weight keeps edges and silences flat areas (where SAR speckle makes random orientations)
    without letting either sensor's contrast decide how much an edge counts.
    """

    name: str = "gradient"

    def field(self, image: np.ndarray, valid: np.ndarray, modality: Modality) -> tuple[np.ndarray, np.ndarray]:
        smooth, core = _prepare(image, valid, modality)
        gy, gx = np.gradient(smooth)
        g = gx + 1j * gy
        power = np.abs(g) ** 2
        if not core.any():
            return np.zeros_like(g), core
        scale = float(np.percentile(power[core], 75)) or 1e-24
        out = g * g / np.maximum(power, 1e-24) * power / (power + scale)
        return np.where(core, out, 0), core


@dataclass(frozen=True)
class IntensityCorrelation:
    """Standardised intensity: the classic choice, good for one sensor, unfit across modalities."""

    name: str = "intensity"

    def field(self, image: np.ndarray, valid: np.ndarray, modality: Modality) -> tuple[np.ndarray, np.ndarray]:
        smooth, core = _prepare(image, valid, modality)
        if not core.any():
            return np.zeros_like(smooth), core
        values = smooth[core]
        out = (smooth - values.mean()) / (values.std() or 1.0)
        return np.where(core, out, 0.0), core


_ESTIMATORS: dict[str, ShiftEstimator] = {"gradient": GradientOrientation(), "intensity": IntensityCorrelation()}


def estimator(name: str) -> ShiftEstimator:
    """The estimator registered under ``name`` ('gradient' or 'intensity')."""
    try:
        return _ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown co-registration method {name!r}; use one of {sorted(_ESTIMATORS)}") from None


def _field(
    est: ShiftEstimator, image: np.ndarray, valid: np.ndarray, modality: Modality
) -> tuple[np.ndarray, np.ndarray]:
    """The field of a 2-D image, or the mean field of a (band, y, x) stack: more bands, less noise."""
    if image.ndim == 2:
        return est.field(image, valid, modality)
    fields = [est.field(plane, valid, modality) for plane in image]
    core = np.logical_and.reduce([ok for _, ok in fields])
    return np.where(core, sum(f for f, _ in fields) / len(fields), 0), core


def _masked_ncc(
    a: np.ndarray, wa: np.ndarray, b: np.ndarray, wb: np.ndarray, radius: int
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised correlation ``Σ conj(a(x)) b(x+s)`` over the shared weights, for |s| <= radius.

    Returns the score and the overlap (sum of shared weights), both (2r+1, 2r+1) indexed [row + r, col + r].
    """
    h, w = a.shape
    shape = (fft.next_fast_len(h + radius + 1), fft.next_fast_len(w + radius + 1))

    def corr(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        return fft.ifft2(np.conj(fft.fft2(p, shape)) * fft.fft2(q, shape))

    num = corr(a * wa, b * wb).real
    ea = corr(np.abs(a) ** 2 * wa, wb).real
    eb = corr(wa, np.abs(b) ** 2 * wb).real
    overlap = corr(wa, wb).real
    rows = np.arange(-radius, radius + 1) % shape[0]
    cols = np.arange(-radius, radius + 1) % shape[1]
    pick = np.ix_(rows, cols)
    denom = np.sqrt(np.clip(ea[pick], 0, None) * np.clip(eb[pick], 0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.where(denom > 1e-12, num[pick] / denom, -np.inf)
    return score, overlap[pick]


def _parabolic(score: np.ndarray, r: int, c: int) -> tuple[float, float]:
    """Sub-pixel offset of a peak from a parabola through it and its two neighbours, per axis."""

    def vertex(left: float, mid: float, right: float) -> float:
        curv = left - 2 * mid + right
        return 0.0 if curv >= 0 or not np.isfinite(curv) else float(np.clip(0.5 * (left - right) / curv, -0.5, 0.5))

    n = score.shape[0]
    if not (0 < r < n - 1 and 0 < c < n - 1):
        return 0.0, 0.0
    return vertex(score[r - 1, c], score[r, c], score[r + 1, c]), vertex(score[r, c - 1], score[r, c], score[r, c + 1])


def _resample(image: np.ndarray, valid: np.ndarray, rows_cols: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Move the content by ``-rows_cols`` (cubic spline); pixels touching invalid or outside data are invalid."""
    back = (-rows_cols[0], -rows_cols[1])
    moved = np.empty(image.shape, np.float64)
    for out, plane in zip(moved.reshape(-1, *image.shape[-2:]), image.reshape(-1, *image.shape[-2:]), strict=True):
        fill = float(np.median(plane[valid])) if valid.any() else 0.0
        out[:] = ndimage.shift(np.where(valid, plane.astype(np.float64), fill), back, order=3, mode="nearest")
    keep = ndimage.shift(valid.astype(np.float64), back, order=1, mode="constant", cval=0.0) > 0.999
    return moved, keep


def estimate_shift(
    reference: np.ndarray,
    moving: np.ndarray,
    *,
    reference_valid: np.ndarray | None = None,
    moving_valid: np.ndarray | None = None,
    modalities: tuple[Modality, Modality] = ("optical", "optical"),
    method: str = "gradient",
    max_shift: float = 5.0,
    iterations: int = 2,
) -> ShiftEstimate:
    """Estimate the sub-pixel shift of ``moving`` against ``reference`` (two images on one grid).

    Parameters
    ----------
    reference, moving
        Images on one grid, (y, x) or (band, y, x) stacks whose fields are averaged (any dtype;
        SAR in linear power or amplitude).
    reference_valid, moving_valid
        Boolean masks of usable pixels (clear, with data); everything else is ignored.
    modalities
        ``"optical"`` or ``"sar"`` for the reference and the moving image.
    method
        ``"gradient"`` (orientation correlation, works across modalities) or ``"intensity"``.
    max_shift
        Largest shift searched, in pixels (per axis).
    iterations
        Refinement passes after the integer search; each resamples ``moving`` by the estimate so far.

    Returns
    -------
    ShiftEstimate
        Shift in pixels (east, north), and a confidence of 0 when the peak is ambiguous, sits on
        the edge of the search window or the images share too little.
    """
    if reference.shape[-2:] != moving.shape[-2:] or not (2 <= reference.ndim <= 3 and 2 <= moving.ndim <= 3):
        raise ValueError(
            f"reference {reference.shape} and moving {moving.shape} must be (y, x) or (band, y, x) on one grid"
        )
    ny, nx = reference.shape[-2:]
    est = estimator(method)
    ref_ok = np.ones((ny, nx), bool) if reference_valid is None else reference_valid
    mov_ok = np.ones((ny, nx), bool) if moving_valid is None else moving_valid
    window = np.outer(tukey(ny, 0.3), tukey(nx, 0.3))
    a, a_ok = _field(est, reference, ref_ok, modalities[0])
    wa = window * a_ok
    reach = math.ceil(max_shift) + 1
    radius = reach + _MARGIN
    b, b_ok = _field(est, moving, mov_ok, modalities[1])
    score, overlap = _masked_ncc(a, wa, b, window * b_ok, radius)
    score = np.where(overlap >= _MIN_OVERLAP * window.sum(), score, -np.inf)
    inner = np.full(score.shape, -np.inf)
    inner[radius - reach : radius + reach + 1, radius - reach : radius + reach + 1] = score[
        radius - reach : radius + reach + 1, radius - reach : radius + reach + 1
    ]
    r, c = np.unravel_index(int(np.argmax(inner)), inner.shape)
    peak = float(inner[r, c])
    if not np.isfinite(peak):
        return ShiftEstimate(float("nan"), float("nan"), 0.0, float("nan"), float(overlap.max() / window.sum()))
    yy, xx = np.ogrid[: score.shape[0], : score.shape[1]]
    rivals = score[(yy - r) ** 2 + (xx - c) ** 2 > _EXCLUDE**2]
    rival = float(rivals[np.isfinite(rivals)].max(initial=0.0))
    on_edge = abs(r - radius) == reach or abs(c - radius) == reach
    confidence = 0.0 if on_edge else max(peak - max(rival, 0.0), 0.0)
    dr, dc = _parabolic(score, r, c)
    shift = np.array([r - radius + dr, c - radius + dc], dtype=np.float64)
    for _ in range(iterations):
        moved, moved_ok = _resample(moving, mov_ok, (shift[0], shift[1]))
        b, b_ok = _field(est, moved, moved_ok, modalities[1])
        local, _ = _masked_ncc(a, wa, b, window * b_ok, 1)
        if not np.isfinite(local[1, 1]):
            break
        lr, lc = np.unravel_index(int(np.argmax(local)), local.shape)
        dr, dc = _parabolic(local, int(lr), int(lc))
        step = np.array([lr - 1 + dr, lc - 1 + dc])
        shift += step
        if np.abs(step).max() < 0.01:
            break
    if np.abs(shift).max() > max_shift + 0.5:
        confidence = 0.0
    return ShiftEstimate(
        dx=float(shift[1]),
        dy=float(-shift[0]),
        confidence=float(confidence),
        correlation=peak,
        overlap=float(overlap[r, c] / window.sum()),
    )
