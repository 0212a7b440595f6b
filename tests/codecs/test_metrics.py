from __future__ import annotations

import math

import numpy as np
import pytest

from eoprep.codecs.metrics import bpppb, max_abs_error, psnr, spectral_angle, ssim


def test_psnr_peaks_follow_the_two_conventions() -> None:
    ref = np.array([[[[1000, 3000], [2000, 2000]]]], dtype=np.uint16)
    dec = ref + np.array([[[[10, 0], [0, 0]]]], dtype=np.uint16)
    mse = 100 / 4
    assert psnr(ref, dec, peak="dtype") == pytest.approx(10 * math.log10(65535**2 / mse))
    assert psnr(ref, dec, peak="range") == pytest.approx(10 * math.log10(2000**2 / mse))
    assert psnr(ref, ref) == math.inf


def test_metrics_ignore_nodata_and_nan() -> None:
    ref = np.array([[[[0, 5], [7, 9]]]], dtype=np.uint16)
    dec = np.array([[[[900, 5], [7, 8]]]], dtype=np.uint16)
    assert max_abs_error(ref, dec, nodata=0) == 1
    f = np.array([[[[np.nan, 1.0]]]], dtype=np.float32)
    assert max_abs_error(f, np.array([[[[3.0, 1.5]]]], dtype=np.float32)) == 0.5


def test_ssim_and_spectral_angle() -> None:
    rng = np.random.default_rng(0)
    ref = rng.uniform(100, 200, size=(1, 3, 32, 32))
    assert ssim(ref, ref) == pytest.approx(1.0)
    assert ssim(ref, ref + rng.normal(0, 20, ref.shape)) < 0.9
    assert spectral_angle(ref, 2 * ref) == pytest.approx(0.0, abs=1e-6)
    swapped = ref[:, ::-1]
    assert spectral_angle(ref, swapped) > 1.0


def test_bpppb_counts_every_band_and_date() -> None:
    assert bpppb(1000, (2, 5, 10, 10)) == 8.0
