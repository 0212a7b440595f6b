"""The readers' own GeoTIFF decoding gives what rasterio gives, for every payload the TACO sink writes."""

from __future__ import annotations

import io
import struct
from typing import Any

import numpy as np
import pytest
from affine import Affine
from rasterio.io import MemoryFile

from eoprep.readers._geotiff import decode_geotiff
from eoprep.readers._sources import _decode_payload
from eoprep.sinks._taco import _geotiff

_TRANSFORM = np.array([500000.0, 10.0, 0.0, 5000000.0, 0.0, -10.0])


def _pixels(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Full-range values (noise defeats zstd, so every byte of the predictors is exercised), NaN and inf for floats."""
    rng = np.random.default_rng(0)
    if np.dtype(dtype).kind == "f":
        arr = (rng.standard_normal(shape) * 1e3).astype(dtype)
        arr[..., :5, :7] = np.nan
        arr.reshape(-1)[::17] = -np.inf
        arr.reshape(-1)[1::17] = -0.0
        return arr
    info = np.iinfo(dtype)
    arr = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    arr[..., : shape[-2] // 2, :] //= 64  # smooth-ish rows compress, so frames differ in size
    return arr


def _payload(arr: np.ndarray) -> bytes:
    times = np.array(["2024-01-01"] * arr.shape[0], dtype="datetime64[us]")
    return _geotiff(arr, "EPSG:32633", _TRANSFORM, 0, [f"b{i}" for i in range(arr.shape[1])], times)


def _rasterio(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    with MemoryFile(io.BytesIO(data)) as mem, mem.open() as ds:
        return ds.read().reshape(shape)


def _gdal_tiff(arr: np.ndarray, **options: Any) -> bytes:
    """A GeoTIFF of ``arr`` ``(band, y, x)`` with creation options the TACO sink does not use."""
    profile = {"driver": "GTiff", "count": arr.shape[0], "height": arr.shape[1], "width": arr.shape[2]}
    profile |= {"dtype": arr.dtype, "crs": "EPSG:32633", "transform": Affine.from_gdal(*_TRANSFORM), **options}
    with MemoryFile() as mem:
        with mem.open(**profile) as dst:
            dst.write(arr)
        return bytes(mem.getbuffer())


@pytest.mark.parametrize("dtype", ["uint16", "float32", "int16", "uint8", "int32", "float64"])
@pytest.mark.parametrize(
    "shape",
    [
        (2, 3, 128, 128),  # tiled, one tile per band: the chips of a run
        (1, 2, 100, 100),  # not a multiple of 16: strips
        (2, 1, 300, 60),  # strips, the last one shorter
        (1, 1, 384, 320),  # tiles of 256, padded at the right and bottom edges
    ],
)
def test_sink_payloads_decode_as_rasterio_reads_them(dtype, shape):
    arr = _pixels(shape, dtype)
    data = _payload(arr)
    got = decode_geotiff(data, shape)
    assert got is not None, "a layout the sink writes fell back to rasterio"
    expected = _rasterio(data, shape)
    assert got.dtype == expected.dtype and got.shape == expected.shape and got.flags.c_contiguous
    assert got.tobytes() == expected.tobytes() == arr.tobytes()  # bit for bit, NaN and -0.0 included


def test_bigtiff_payloads_decode():
    arr = _pixels((3, 64, 64), "uint16")
    data = _gdal_tiff(arr, compress="zstd", predictor=2, interleave="band", BIGTIFF="YES")
    assert data[:4] == b"II+\x00"
    got = decode_geotiff(data, arr.shape)
    assert got is not None and got.tobytes() == arr.tobytes()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_float_predictor_payloads_decode(dtype):
    """Shards written before floats dropped the predictor (TIFF predictor 3) still decode bit for bit."""
    arr = _pixels((4, 128, 128), dtype)
    data = _gdal_tiff(arr, compress="zstd", predictor=3, interleave="band", tiled=True, blockxsize=128, blockysize=128)
    got = decode_geotiff(data, (2, 2, 128, 128))
    assert got is not None and got.tobytes() == arr.tobytes()


@pytest.mark.parametrize(
    "options",
    [
        {"compress": "deflate", "interleave": "band"},
        {"compress": "zstd", "interleave": "pixel"},
        {
            "compress": "zstd",
            "interleave": "band",
            "tiled": True,
            "blockxsize": 16,
            "blockysize": 16,
            "sparse_ok": True,
        },
    ],
    ids=["deflate", "pixel-interleaved", "sparse-tiles"],
)
def test_other_layouts_fall_back_to_rasterio(options):
    arr = _pixels((2, 32, 32), "uint16")
    arr[:, :16, :16] = 0  # an empty tile, left out of a sparse file
    data = _gdal_tiff(arr, nodata=0, **options)
    assert decode_geotiff(data, (1, *arr.shape)) is None
    assert _decode_payload(data, (1, *arr.shape)).tobytes() == arr.tobytes()


def test_a_payload_of_another_shape_is_not_decoded():
    arr = _pixels((1, 2, 64, 64), "uint16")
    assert decode_geotiff(_payload(arr), (1, 2, 64, 32)) is None
    assert decode_geotiff(_payload(arr), (1, 3, 64, 64)) is None


def test_blocks_that_decompress_short_raise():
    """A header that claims more rows than the blocks hold raises instead of returning uninitialised pixels."""
    arr = _pixels((1, 2, 30, 30), "uint16")  # one strip per band
    data = bytearray(_payload(arr))
    (ifd,) = struct.unpack_from("<I", data, 4)
    (n,) = struct.unpack_from("<H", data, ifd)
    patched = set()
    for entry in range(ifd + 2, ifd + 2 + 12 * n, 12):
        tag, kind, count, value = struct.unpack_from("<HHIH", data, entry)
        if tag in (257, 278):  # ImageLength, RowsPerStrip: 30 -> 31
            assert (kind, count, value) == (3, 1, 30)
            struct.pack_into("<H", data, entry + 8, 31)
            patched.add(tag)
    assert patched == {257, 278}
    with pytest.raises(ValueError, match="decompress to 3600 bytes instead of 3720"):
        decode_geotiff(bytes(data), (1, 2, 31, 30))
