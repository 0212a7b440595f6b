from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from codec_cubes import s2_cube

from eoprep.codecs import CodecError, CodecSpec, EoprepChipCodec, zarr_codecs
from eoprep.codecs.metrics import psnr


@pytest.fixture
def s2_like() -> np.ndarray:
    return s2_cube()


def _chips(s2_like: np.ndarray, n: int = 3) -> np.ndarray:
    return np.stack([np.where(s2_like == 0, 0, s2_like + i) for i in range(n)]).astype(np.uint16)


@pytest.mark.parametrize(
    "spec",
    [CodecSpec(name="ffv1"), CodecSpec(name="jpegxl", lossless=True), CodecSpec(name="zstd", level=5)],
    ids=lambda s: s.name,
)
def test_lossless_store_round_trips_through_sharding(tmp_path: Path, spec: CodecSpec, s2_like: np.ndarray) -> None:
    data = _chips(s2_like)
    chip = (1, *data.shape[1:])
    arr = zarr.create_array(
        tmp_path / "c.zarr",
        shape=data.shape,
        dtype=data.dtype,
        chunks=chip,
        shards=(2, *chip[1:]),
        fill_value=0,
        dimension_names=["chip", "time", "band", "y", "x"],
        **zarr_codecs(spec, data.dtype),
    )
    arr[:] = data
    meta = json.loads((tmp_path / "c.zarr" / "zarr.json").read_text())
    sharding = meta["codecs"][0]
    assert sharding["name"] == "sharding_indexed"
    inner = sharding["configuration"]["codecs"][0]["name"]
    assert inner == ("bytes" if spec.name == "zstd" else "eoprep.chip")
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "c.zarr")[:], data)


def test_lossy_store_opens_with_xarray(tmp_path: Path, s2_like: np.ndarray) -> None:
    data = _chips(s2_like, 2)
    spec = CodecSpec(name="h265", quality=16, nodata=0)
    chip = (1, *data.shape[1:])
    group = zarr.open_group(tmp_path / "s.zarr", mode="w")
    arr = group.create_array(
        "reflectance",
        shape=data.shape,
        dtype=data.dtype,
        chunks=chip,
        shards=chip,
        fill_value=0,
        dimension_names=["chip", "time", "band", "y", "x"],
        **zarr_codecs(spec, data.dtype),
    )
    arr[:] = data
    ds = xr.open_zarr(tmp_path / "s.zarr", consolidated=False, mask_and_scale=False)
    out = ds["reflectance"].values
    assert out.dtype == np.uint16
    assert psnr(data, out, nodata=0) > 35
    np.testing.assert_array_equal(out == 0, data == 0)


def test_codec_config_is_json_and_rebuilds() -> None:
    codec = EoprepChipCodec(spec=CodecSpec(name="av1", target_bpppb=0.1))
    config = json.loads(json.dumps(codec.to_dict()))
    assert config == {"name": "eoprep.chip", "configuration": {"spec": {"name": "av1", "target_bpppb": 0.1}}}
    assert EoprepChipCodec.from_dict(config) == codec


def test_zarr_codecs_defaults_and_refusals() -> None:
    plain = zarr_codecs(CodecSpec(name="zstd"), "uint16")
    assert plain["compressors"][0].level == 3
    with pytest.raises(CodecError, match="lossless ffv1 codes integers only"):
        zarr_codecs(CodecSpec(name="ffv1"), "float32")
    with pytest.raises(CodecError, match="cannot store dtype float64"):
        zarr_codecs(CodecSpec(name="h265"), "float64")


def test_corrupt_chunk_raises_on_read(tmp_path: Path, s2_like: np.ndarray) -> None:
    data = _chips(s2_like, 1)
    chip = (1, *data.shape[1:])
    arr = zarr.create_array(
        tmp_path / "k.zarr",
        shape=data.shape,
        dtype=data.dtype,
        chunks=chip,
        **zarr_codecs(CodecSpec(name="jpegxl", quality=1.0), data.dtype),
    )
    arr[:] = data
    chunk = tmp_path / "k.zarr" / "c" / "0" / "0" / "0" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(CodecError, match="checksum mismatch"):
        zarr.open_array(tmp_path / "k.zarr")[:]


def test_fill_value_is_the_nodata_lossy_codecs_keep(tmp_path: Path, s2_like: np.ndarray) -> None:
    data = _chips(s2_like, 1)
    arr = zarr.create_array(
        tmp_path / "f.zarr",
        shape=data.shape,
        dtype=data.dtype,
        chunks=data.shape,
        fill_value=0,
        **zarr_codecs(CodecSpec(name="h265", quality=30), data.dtype),
    )
    arr[:] = data
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "f.zarr")[:] == 0, data == 0)


def test_reading_without_eoprep_names_the_package(tmp_path: Path, s2_like: np.ndarray, monkeypatch) -> None:
    data = _chips(s2_like, 1)
    arr = zarr.create_array(
        tmp_path / "m.zarr",
        shape=data.shape,
        dtype=data.dtype,
        chunks=data.shape,
        **zarr_codecs(CodecSpec(name="ffv1"), data.dtype),
    )
    arr[:] = data
    # What a reader without eoprep sees: zarr's codec registry holds no entry for our codec id.
    registries = vars(zarr.registry)["__codec_registries"]
    monkeypatch.delitem(registries, "eoprep.chip")
    with pytest.raises(zarr.errors.UnknownCodecError, match=r"Unknown codec: 'eoprep\.chip'"):
        zarr.open_array(tmp_path / "m.zarr")
