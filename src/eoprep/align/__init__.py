"""Co-registration and quality masks: every sensor of a chip on one pixel grid, to the sub-pixel.

One entry function, `coregister_chip`, runs inside the chip task after all collections are read;
the estimators behind it share one small protocol (`ShiftEstimator`). `warp_to_grid` puts rasters
that carry only GCPs (Sentinel-1 GRD) on a chip grid; `MaskRule` turns SCL / QA_PIXEL into flags.
"""

from __future__ import annotations

from eoprep.align._coregister import AlignRole, SceneShift, apply_shift, coregister_chip
from eoprep.align._estimate import (
    GradientOrientation,
    IntensityCorrelation,
    Modality,
    ShiftEstimate,
    ShiftEstimator,
    estimate_shift,
    estimator,
)
from eoprep.align._masks import QA_PIXEL_BITS, SCL_CLASSES, MaskRule, QualityRules, mask_rule
from eoprep.align._warp import warp_to_grid

__all__ = [
    "QA_PIXEL_BITS",
    "SCL_CLASSES",
    "AlignRole",
    "GradientOrientation",
    "IntensityCorrelation",
    "MaskRule",
    "QualityRules",
    "Modality",
    "SceneShift",
    "ShiftEstimate",
    "ShiftEstimator",
    "apply_shift",
    "coregister_chip",
    "estimate_shift",
    "estimator",
    "mask_rule",
    "warp_to_grid",
]
