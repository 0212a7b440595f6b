"""A procedural landscape that any sensor can sample at any position, so shifts between sensors are exact.

Land cover is a Voronoi field of parcels plus a river; reflectance follows the class, a crop calendar
and smooth texture. Because every value is a function of continuous map coordinates, sampling a
sensor's grid at (x + dx, y + dy) gives imagery with a known sub-pixel misregistration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["CLASSES", "S2_BANDS", "Landscape", "Site"]

#: Land-cover classes of the demo landscape.
CLASSES = ("cropland", "forest", "water", "urban", "bare")

# Surface reflectance per class for S2 bands (B02 B03 B04 B08 B11 B12); the crop calendar scales
# the red/NIR contrast of cropland between bare soil and full canopy.
_REFLECTANCE = {
    "cropland": (0.04, 0.07, 0.05, 0.35, 0.20, 0.11),
    "forest": (0.03, 0.05, 0.03, 0.30, 0.15, 0.07),
    "water": (0.06, 0.05, 0.03, 0.02, 0.01, 0.005),
    "urban": (0.12, 0.13, 0.14, 0.20, 0.24, 0.21),
    "bare": (0.09, 0.12, 0.16, 0.22, 0.30, 0.26),
}
S2_BANDS = ("B02", "B03", "B04", "B08", "B11", "B12")
_SOIL = np.array(_REFLECTANCE["bare"])


@dataclass(frozen=True)
class Site:
    """The date-independent fields of the landscape sampled on one grid."""

    cls: np.ndarray
    parcel: np.ndarray
    texture: np.ndarray


@dataclass
class Landscape:
    """Parcels, river and texture over a square extent in a projected CRS (metres)."""

    x_min: float
    y_min: float
    extent: float
    seed: int = 0

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        n_parcels = max(16, int((self.extent / 350.0) ** 2))
        self._seeds = np.column_stack(
            [self.x_min + rng.uniform(0, self.extent, n_parcels), self.y_min + rng.uniform(0, self.extent, n_parcels)]
        )
        self._tree = cKDTree(self._seeds)
        self._parcel_class = rng.choice(len(CLASSES), size=n_parcels, p=[0.45, 0.25, 0.05, 0.1, 0.15])
        self._parcel_phase = rng.uniform(0, 2 * np.pi, n_parcels)
        self._parcel_gain = rng.uniform(0.85, 1.15, n_parcels)
        self._waves = rng.normal(size=(12, 2)) / rng.uniform(150.0, 900.0, size=(12, 1))
        self._wave_phase = rng.uniform(0, 2 * np.pi, 12)
        self._river_phase = rng.uniform(0, 2 * np.pi)

    def _texture(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        out = np.zeros(np.broadcast_shapes(x.shape, y.shape))
        for (kx, ky), phase in zip(self._waves, self._wave_phase, strict=True):
            out += np.sin(2 * np.pi * (kx * x + ky * y) + phase)
        return out / np.sqrt(len(self._waves))

    def site(self, x: np.ndarray, y: np.ndarray) -> Site:
        """Evaluate the static part of the landscape once per sensor grid; dates reuse it."""
        cls, parcel = self._classes(x, y)
        return Site(cls=cls, parcel=parcel, texture=self._texture(x, y))

    def _classes(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        xx, yy = np.broadcast_arrays(x, y)
        _, parcel = self._tree.query(np.column_stack([xx.ravel(), yy.ravel()]))
        parcel = parcel.reshape(xx.shape)
        cls = self._parcel_class[parcel].copy()
        centre = self.y_min + self.extent * (
            0.5 + 0.2 * np.sin(2 * np.pi * (xx - self.x_min) / self.extent * 1.5 + self._river_phase)
        )
        cls[np.abs(yy - centre) < 40.0] = CLASSES.index("water")
        return cls, parcel

    def reflectance(self, site: Site, day_of_year: float) -> np.ndarray:
        """Surface reflectance (6, ny, nx) for S2-like bands on a given day."""
        cls, parcel = site.cls, site.parcel
        table = np.array([_REFLECTANCE[c] for c in CLASSES])
        refl = table[cls].transpose(2, 0, 1).copy()
        crop = cls == CLASSES.index("cropland")
        canopy = 0.5 + 0.5 * np.sin(2 * np.pi * day_of_year / 365.0 + self._parcel_phase[parcel])
        mix = np.where(crop, canopy, 1.0)
        refl = np.where(crop, mix * refl + (1 - mix) * _SOIL[:, None, None], refl)
        refl *= self._parcel_gain[parcel]
        refl *= 1.0 + 0.08 * site.texture
        return np.clip(refl, 0.001, 1.0)

    def backscatter(self, site: Site, day_of_year: float) -> np.ndarray:
        """Linear gamma0 (2, ny, nx) for VV and VH, before speckle."""
        cls, parcel = site.cls, site.parcel
        vv = np.array([0.08, 0.12, 0.004, 0.45, 0.05])[cls]
        vh = np.array([0.02, 0.035, 0.0008, 0.08, 0.008])[cls]
        crop = cls == CLASSES.index("cropland")
        growth = 0.7 + 0.6 * np.sin(2 * np.pi * day_of_year / 365.0 + self._parcel_phase[parcel])
        vh = np.where(crop, vh * growth, vh)
        texture = 1.0 + 0.15 * site.texture
        return np.stack([vv * texture, vh * texture])

    def clouds(self, x: np.ndarray, y: np.ndarray, seed: int, cover: float) -> np.ndarray:
        """Cloud opacity in [0, 1]: smooth blobs covering about ``cover`` of the scene."""
        if cover <= 0:
            return np.zeros(np.broadcast_shapes(x.shape, y.shape))
        rng = np.random.default_rng(seed)
        field = np.zeros(np.broadcast_shapes(x.shape, y.shape))
        for _ in range(8):
            k = rng.normal(size=2) / rng.uniform(600.0, 2500.0)
            field += np.sin(2 * np.pi * (k[0] * x + k[1] * y) + rng.uniform(0, 2 * np.pi))
        field /= np.sqrt(8)
        threshold = np.quantile(field, 1.0 - cover)
        return np.clip((field - threshold) / 0.3, 0.0, 1.0)
