"""Synthetic EO-like cubes for the codec tests.

A helper module, not a ``conftest.py``: without ``__init__.py`` files pytest imports every conftest as the
module ``conftest``, so a second one here would shadow ``tests/conftest.py`` for ``from conftest import``.
"""

from __future__ import annotations

import numpy as np


def smooth_cube(shape: tuple[int, int, int, int], *, lo: float, hi: float, seed: int = 0) -> np.ndarray:
    """A float cube with spatial structure, band correlation and slow change over time (like EO data)."""
    rng = np.random.default_rng(seed)
    t, b, y, x = shape
    field = np.cumsum(np.cumsum(rng.normal(size=(y + 8, x + 8)), axis=0), axis=1)[4 : 4 + y, 4 : 4 + x]
    field = (field - field.min()) / np.ptp(field)
    gains = 0.6 + 0.4 * rng.random(b)
    cube = np.stack([[g * field * (1 + 0.03 * k) for g in gains] for k in range(t)])
    cube += rng.normal(0, 0.01, cube.shape)
    return lo + (hi - lo) * np.clip(cube, 0, 1)


def s2_cube() -> np.ndarray:
    """uint16 reflectance cube (8, 4, 64, 64) with a nodata (0) patch."""
    cube = smooth_cube((8, 4, 64, 64), lo=200, hi=3800).astype(np.uint16)
    cube[2, :, 10:20, 30:45] = 0
    return cube


def sar_cube() -> np.ndarray:
    """float32 backscatter in dB (4, 2, 48, 40) with NaN gaps."""
    cube = smooth_cube((4, 2, 48, 40), lo=-25, hi=5, seed=1).astype(np.float32)
    cube[1, 0, 5:9, 7:30] = np.nan
    return cube
