"""Pipeline outputs written with eoprep codecs read back through plain xarray, and `eoprep bench codecs`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr

from conftest import make_spec
from eoprep.cli import main
from eoprep.codecs.bench import BASELINE
from eoprep.codecs.metrics import psnr
from eoprep.demo import S2_COLLECTION
from eoprep.pipeline import run_pipeline

pytestmark = pytest.mark.slow

#: Codecs are per output, so codec runs write S2 only (uint16); the float32 S1 group stays on the default.
S2_ONLY = [{"id": S2_COLLECTION, "name": "s2", "bands": ["B02", "B03", "B04", "B08", "B11", "B12", "SCL"]}]


def _quiet(_msg: str) -> None:
    pass


def _run(out: Path, stac_api: str, client, **changes) -> Path:
    summary = run_pipeline(make_spec(out, **changes), client=client, catalog_url=stac_api, say=_quiet)
    assert summary.chips_written == summary.chips_planned > 0
    return out


def _s2(out: Path) -> xr.DataArray:
    return xr.open_zarr(out / "chips.zarr", group="s2", mask_and_scale=False)["pixels"].sortby("chip")


def _stored(out: Path) -> int:
    return int(zarr.open_array(out / "chips.zarr", path="s2/pixels").nbytes_stored())


@pytest.fixture(scope="module")
def zstd_run(stac_api, client, tmp_path_factory) -> Path:
    """The default output (zarr's blosc-lz4), S2 and S1: the reference for codec runs and the bench's input."""
    return _run(tmp_path_factory.mktemp("codecs") / "zstd", stac_api, client)


@pytest.mark.parametrize(
    "codec",
    # 12-bit h265 cannot hold the demo's range (0 nodata to 6500 saturated cloud), so lossless uses 16-bit codecs.
    [{"name": "ffv1"}, {"name": "jpegxl", "lossless": True}],
    ids=lambda c: c["name"],
)
def test_lossless_codec_output_decodes_bit_exact(zstd_run, stac_api, client, tmp_path, codec) -> None:
    out = _run(tmp_path / "out", stac_api, client, source__collections=S2_ONLY, output__codec=codec)
    meta = zarr.open_array(out / "chips.zarr", path="s2/pixels").metadata.to_dict()
    assert meta["codecs"][0]["configuration"]["codecs"][0]["name"] == "eoprep.chip"
    got, want = _s2(out), _s2(zstd_run)
    assert list(got["chip"].values) == list(want["chip"].values)
    np.testing.assert_array_equal(got.values, want.values)


def test_lossy_video_output_is_close_and_smaller(zstd_run, stac_api, client, tmp_path) -> None:
    codec = {"name": "h265", "quality": 16}
    out = _run(tmp_path / "out", stac_api, client, source__collections=S2_ONLY, output__codec=codec)
    got, want = _s2(out).values, _s2(zstd_run).values
    assert psnr(want, got, nodata=0) > 40
    np.testing.assert_array_equal(got == 0, want == 0)
    assert _stored(out) < _stored(zstd_run) / 3


def test_bench_codecs_cli_writes_rd_table_and_plot(zstd_run, tmp_path, capsys) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(make_spec(zstd_run).model_dump_json())
    out = tmp_path / "bench"
    assert main(["bench", "codecs", "--spec", str(spec), "--out", str(out), "--chips", "1", "--quick"]) == 0
    table = pd.read_csv(out / "rd.csv")
    assert (out / "rd.png").read_bytes()[:4] == b"\x89PNG"
    assert set(table["cube"].str.split("/").str[0]) == {"s1", "s2"}
    s2 = table[table["cube"].str.startswith("s2/")]
    families = set(s2["codec"].str.removesuffix("-lossless"))
    assert families == {
        "zstd",
        "blosc2",
        "lerc",
        "ffv1",
        "jpegxl",
        "jpeg2000",
        "htj2k",
        "h264",
        "h265",
        "av1",
        BASELINE,
    }
    assert s2.loc[s2["codec"].str.endswith("-lossless"), "exact"].all()
    err = capsys.readouterr().err
    assert "PSNR @0.1 bpppb" in err and BASELINE in err


def test_bench_codecs_without_output_says_to_run_first(tmp_path, capsys) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(make_spec(tmp_path / "never-run").model_dump_json())
    assert main(["bench", "codecs", "--spec", str(spec)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{tmp_path / 'never-run' / 'chips.zarr'}: not found" in err and f"eoprep run {spec}" in err
