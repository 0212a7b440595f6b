"""From chip values to the unsigned integer planes that image and video encoders take, and back.

Values go through per-component offset/scale to the coded bit depth. Lossy coding first rotates the bands
onto their principal components (KLT) and uses one scale for all components: with an orthonormal rotation
and one quantiser step, the encoder's error spreads evenly over the bands, which is what minimises the
cube's mean squared error. Planes are tiled into a near-square grid per time step so one encoder call sees
every band (inter-band similarity can be exploited by prediction) and small chips still make frames big
enough for the encoders.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ._base import CodecError


@dataclass(frozen=True)
class PlaneMapping:
    """Affine map (optionally after a KLT) from band values to codes; stored in the payload header."""

    offset: list[float]
    scale: list[float]
    basis: list[list[float]] | None = None
    mean: list[float] | None = None

    def to_codes(self, chip: np.ndarray, bit_depth: int) -> np.ndarray:
        """Map a float chip (T, B, Y, X) to uint16 codes (T, C, Y, X)."""
        x = chip.astype(np.float64)
        if self.basis is not None:
            x = np.einsum("bc,tbyx->tcyx", np.asarray(self.basis), x - np.asarray(self.mean)[:, None, None])
        z = (x - np.asarray(self.offset)[:, None, None]) / np.asarray(self.scale)[:, None, None]
        return np.clip(np.rint(z), 0, (1 << bit_depth) - 1).astype(np.uint16)

    def from_codes(self, codes: np.ndarray) -> np.ndarray:
        """Map codes (T, C, Y, X) back to float32 band values (T, B, Y, X).

        float32 holds every integer code and offset exactly (lossless paths stay exact) and, for lossy
        ones, keeps the rounding error far below one step; it halves the memory traffic of float64,
        and the KLT inverse is one matrix product per time step. Decoding is what training readers wait on.
        """
        x = codes.astype(np.float32)
        x *= np.asarray(self.scale, dtype=np.float32)[:, None, None]
        x += np.asarray(self.offset, dtype=np.float32)[:, None, None]
        if self.basis is None:
            return x
        t, c, y, w = x.shape
        basis = np.asarray(self.basis, dtype=np.float32)
        out = np.matmul(basis, x.reshape(t, c, y * w)).reshape(t, basis.shape[0], y, w)
        out += np.asarray(self.mean, dtype=np.float32)[:, None, None]
        return out

    def to_json(self) -> dict:
        """Header form."""
        return asdict(self)


def fit_mapping(
    chip: np.ndarray, valid: np.ndarray | None, bit_depth: int, *, exact: bool, decorrelate: bool, codec: str
) -> PlaneMapping:
    """Choose offset/scale (and KLT basis) for ``chip`` so its valid values fill ``bit_depth`` bits.

    ``exact`` (lossless) keeps integers as they are (scale 1) and refuses values that do not fit.
    """
    n_bands = chip.shape[1]
    top = (1 << bit_depth) - 1
    per_band = np.moveaxis(chip, 1, 0).reshape(n_bands, -1).astype(np.float64)
    if valid is not None:
        keep = np.moveaxis(valid, 1, 0).reshape(n_bands, -1).all(axis=0)
        per_band = per_band[:, keep]
    if per_band.shape[1] == 0:
        return PlaneMapping(offset=[0.0] * n_bands, scale=[1.0] * n_bands)
    lo, hi = per_band.min(axis=1), per_band.max(axis=1)
    if exact:
        if chip.dtype.kind == "f":
            raise CodecError(
                f"lossless {codec} codes integers only; float32 chips need zstd, blosc2 or lerc with max_error 0"
            )
        wide = np.flatnonzero(hi - lo > top)
        if wide.size:
            b = int(wide[0])
            raise CodecError(
                f"lossless {codec} at {bit_depth} bits needs each band's value range below {top + 1}; band {b} "
                f"spans {lo[b]:g}–{hi[b]:g}: raise bit_depth, or use ffv1 (16-bit), jpegxl or zstd"
            )
        return PlaneMapping(offset=lo.tolist(), scale=[1.0] * n_bands)
    if decorrelate and n_bands > 1:
        mean = per_band.mean(axis=1)
        cov = np.cov(per_band - mean[:, None]) if per_band.shape[1] > 1 else np.eye(n_bands)
        _, vecs = np.linalg.eigh(np.atleast_2d(cov))
        basis = vecs[:, ::-1]
        comps = basis.T @ (per_band - mean[:, None])
        c_lo, c_hi = comps.min(axis=1), comps.max(axis=1)
        step = max(float((c_hi - c_lo).max()) / top, 1e-12)
        return PlaneMapping(offset=c_lo.tolist(), scale=[step] * n_bands, basis=basis.tolist(), mean=mean.tolist())
    span = np.where(hi > lo, hi - lo, 1.0)
    return PlaneMapping(offset=lo.tolist(), scale=(span / top).tolist())


def mapping_from_json(data: dict) -> PlaneMapping:
    """Inverse of `PlaneMapping.to_json`."""
    return PlaneMapping(**data)


def tile_grid(n_planes: int) -> tuple[int, int]:
    """Rows and columns of a near-square grid holding ``n_planes`` tiles."""
    cols = math.ceil(math.sqrt(n_planes))
    return math.ceil(n_planes / cols), cols


def tile_frames(codes: np.ndarray, align: int) -> np.ndarray:
    """Tile (T, C, Y, X) codes into frames (T, rows*Yp, cols*Xp), edges padded to a multiple of ``align``."""
    t, c, y, x = codes.shape
    yp, xp = -(-y // align) * align, -(-x // align) * align
    padded = np.pad(codes, ((0, 0), (0, 0), (0, yp - y), (0, xp - x)), mode="edge")
    rows, cols = tile_grid(c)
    grid = np.zeros((t, rows * cols, yp, xp), dtype=codes.dtype)
    grid[:, :c] = padded
    return grid.reshape(t, rows, cols, yp, xp).transpose(0, 1, 3, 2, 4).reshape(t, rows * yp, cols * xp)


def untile_frames(frames: np.ndarray, shape: tuple[int, int, int, int], align: int) -> np.ndarray:
    """Inverse of `tile_frames`: frames back to (T, C, Y, X), padding cropped."""
    t, c, y, x = shape
    yp, xp = -(-y // align) * align, -(-x // align) * align
    rows, cols = tile_grid(c)
    grid = frames[:, : rows * yp, : cols * xp].reshape(t, rows, yp, cols, xp).transpose(0, 1, 3, 2, 4)
    return grid.reshape(t, rows * cols, yp, xp)[:, :c, :y, :x]
