"""Quality layers → pixel flags: Sentinel-2 SCL classes and Landsat Collection 2 QA_PIXEL bits.

One rule per collection, built from the spec's ``quality`` section, so composites, the chip index
(valid and cloud fraction) and co-registration all agree on which pixels are usable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["QA_PIXEL_BITS", "SCL_CLASSES", "MaskRule", "QualityRules", "mask_rule"]

#: Sentinel-2 L2A scene classification: flag → class values.
SCL_CLASSES: dict[str, tuple[int, ...]] = {
    "nodata": (0,),
    "saturated": (1,),
    "shadow": (3,),
    "cloud": (8, 9, 10),
    "snow": (11,),
}
#: Landsat Collection 2 QA_PIXEL: flag → bit numbers (fill, dilated cloud, cirrus, cloud, shadow, snow).
QA_PIXEL_BITS: dict[str, tuple[int, ...]] = {
    "nodata": (0,),
    "cloud": (1, 2, 3),
    "shadow": (4,),
    "snow": (5,),
}


@dataclass(frozen=True)
class MaskRule:
    """How to read one collection's quality band: class values (SCL) or bit numbers (QA_PIXEL).

    ``exclude`` flags make a pixel unusable for composites and co-registration; ``cloud`` flags
    are what the chip's cloud fraction counts.
    """

    band: str
    kind: Literal["classes", "bits"]
    flags: Mapping[str, tuple[int, ...]]
    exclude: tuple[str, ...]
    cloud: tuple[str, ...]

    def flagged(self, layer: np.ndarray, names: Sequence[str]) -> np.ndarray:
        """Pixels of ``layer`` that carry any of the flags ``names``."""
        codes = [v for name in names for v in self.flags.get(name, ())]
        if self.kind == "classes":
            return np.isin(layer, codes)
        bits = sum(1 << b for b in codes)
        whole = np.where(np.isfinite(layer), layer, 0) if layer.dtype.kind == "f" else layer
        return (whole.astype(np.int64) & bits) != 0

    def unusable(self, layer: np.ndarray) -> np.ndarray:
        """Pixels to leave out of composites and shift estimation."""
        return self.flagged(layer, self.exclude)

    def cloudy(self, layer: np.ndarray) -> np.ndarray:
        """Pixels counted as cloud."""
        return self.flagged(layer, self.cloud)


def mask_rule(
    bands: Sequence[str],
    *,
    mask_bands: Mapping[str, str],
    scl: Mapping[str, Sequence[int]],
    qa_pixel: Mapping[str, Sequence[int]],
    exclude: Sequence[str],
    cloud: Sequence[str],
) -> MaskRule | None:
    """The rule for the first of ``bands`` named in ``mask_bands`` (band → 'scl' | 'qa_pixel'), if any."""
    for band in bands:
        kind = mask_bands.get(band)
        if kind is None:
            continue
        table = scl if kind == "scl" else qa_pixel
        return MaskRule(
            band=band,
            kind="classes" if kind == "scl" else "bits",
            flags={k: tuple(v) for k, v in table.items()},
            exclude=tuple(exclude),
            cloud=tuple(cloud),
        )
    return None


@dataclass(frozen=True)
class QualityRules:
    """One collection's quality band rule and the thresholds that drop a chip (None: no threshold)."""

    mask: MaskRule | None
    max_cloud: float | None = None
    min_valid: float | None = None

    def verdict(self, key: str, valid_fraction: float, cloud_fraction: float) -> str | None:
        """Why the chip is dropped for this collection, or None to keep it."""
        if self.min_valid is not None and not valid_fraction >= self.min_valid:
            return f"quality: {key} valid_fraction {valid_fraction:.3f} < quality.min_valid {self.min_valid}"
        if self.max_cloud is not None and cloud_fraction > self.max_cloud:
            return f"quality: {key} cloud_fraction {cloud_fraction:.3f} > quality.max_cloud {self.max_cloud}"
        return None
