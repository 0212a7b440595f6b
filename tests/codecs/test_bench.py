from __future__ import annotations

from pathlib import Path
from typing import get_args

import numpy as np
import pytest
from codec_cubes import s2_cube, sar_cube

from eoprep.codecs import CodecSpec
from eoprep.codecs._spec import CodecName
from eoprep.codecs.bench import (
    BASELINE,
    cubes_from_output,
    default_specs,
    encode_xarrayvideo,
    psnr_at_bpppb,
    run_codec_benchmark,
    summarize,
)
from eoprep.errors import EoprepError


@pytest.fixture
def s2_like() -> np.ndarray:
    return s2_cube()


@pytest.fixture
def sar_like() -> np.ndarray:
    return sar_cube()


def test_baseline_recipe_is_lossy_even_at_crf0(s2_like: np.ndarray) -> None:
    n_bytes, decoded = encode_xarrayvideo(s2_like[:2, :4], 0)
    assert n_bytes > 0
    assert decoded.dtype == np.float64
    assert not np.array_equal(np.rint(decoded), s2_like[:2, :4])


def test_benchmark_writes_table_and_plot(tmp_path: Path, s2_like: np.ndarray) -> None:
    cubes = {"tiny": s2_like[:2, :, :32, :32]}
    specs = [CodecSpec(name="h265", quality=q) for q in (10, 25, 40)] + [CodecSpec(name="zstd")]
    table = run_codec_benchmark(cubes, specs, tmp_path, baseline_crfs=(10, 25, 40), nodata=0)
    assert (tmp_path / "rd.csv").stat().st_size > 0
    assert (tmp_path / "rd.png").read_bytes()[:4] == b"\x89PNG"
    assert set(table["codec"]) == {"h265", "zstd-lossless", BASELINE}
    assert table.loc[table["codec"] == "zstd-lossless", "exact"].all()
    h265 = table[table["codec"] == "h265"]
    rate = float(h265["bpppb"].median())
    at = psnr_at_bpppb(table, rate).set_index("codec")
    assert at.loc["h265", "psnr_range"] == h265.set_index("bpppb").loc[rate, "psnr_range"]
    assert np.isnan(psnr_at_bpppb(table, 1e-6).set_index("codec").loc["h265", "psnr_range"])


def test_default_specs_cover_every_codec_the_dtype_allows(s2_like: np.ndarray, sar_like: np.ndarray) -> None:
    ints = default_specs(s2_like, quick=True)
    assert {s.name for s in ints} == set(get_args(CodecName))
    assert {s.name for s in ints if s.lossless} == {
        "zstd",
        "blosc2",
        "lerc",
        "ffv1",
        "jpegxl",
        "jpeg2000",
        "htj2k",
        "h265",
    }
    floats = default_specs(sar_like)
    assert {s.name for s in floats if s.lossless} == {"zstd", "blosc2", "lerc"}
    span = float(np.nanmax(sar_like) - np.nanmin(sar_like))
    assert max(s.max_error for s in floats if s.name == "lerc" and not s.lossless) == pytest.approx(0.1 * span)


def test_summarize_folds_lossless_modes_into_codec_rows(tmp_path: Path, s2_like: np.ndarray) -> None:
    cubes = {"a": s2_like[:2, :, :32, :32], "b": s2_like[2:4, :, :32, :32]}
    specs = [CodecSpec(name="jpegxl", quality=q) for q in (0.05, 1.0, 16.0)] + [CodecSpec(name="jpegxl", lossless=True)]
    table = run_codec_benchmark(cubes, specs, tmp_path, baseline_crfs=(), nodata={"a": 0, "b": 0})
    summary = summarize(table, rates=(2.0, 1e-6))
    assert list(summary.index) == ["jpegxl"]
    per_cube = psnr_at_bpppb(table, 2.0)["psnr_range"]
    assert per_cube.notna().all()
    assert summary.loc["jpegxl", "psnr@2"] == pytest.approx(per_cube.mean())
    assert np.isnan(summary.loc["jpegxl", "psnr@1e-06"])
    lossless = table[table["codec"] == "jpegxl-lossless"]
    assert summary.loc["jpegxl", "lossless_ratio"] == pytest.approx(2 * cubes["a"].nbytes / lossless["bytes"].sum())
    assert summary.loc["jpegxl", "lossless_exact"]


def test_cubes_from_output_needs_a_chips_store(tmp_path: Path) -> None:
    with pytest.raises(EoprepError, match=r"chips.zarr: no chips store here; run `eoprep run SPEC`"):
        cubes_from_output(tmp_path)
