from __future__ import annotations

from pathlib import Path

import numpy as np

from eoprep.codecs import CodecSpec
from eoprep.codecs.bench import BASELINE, encode_xarrayvideo, psnr_at_bpppb, run_codec_benchmark


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
