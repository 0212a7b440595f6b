from __future__ import annotations

import numpy as np
import pytest
from codec_cubes import s2_cube, sar_cube

from eoprep.codecs import CodecError, CodecSpec, decode_chip, encode_chip
from eoprep.codecs.metrics import psnr


@pytest.fixture
def s2_like() -> np.ndarray:
    return s2_cube()


@pytest.fixture
def sar_like() -> np.ndarray:
    return sar_cube()


LOSSLESS_INT = [
    {"name": "zstd"},
    {"name": "blosc2"},
    {"name": "ffv1"},
    {"name": "h265", "lossless": True, "bit_depth": 12},
    {"name": "jpegxl", "lossless": True},
    {"name": "jpeg2000", "lossless": True},
    {"name": "htj2k", "lossless": True},
    {"name": "lerc", "max_error": 0},
]


@pytest.mark.parametrize("spec", LOSSLESS_INT, ids=lambda s: s["name"])
def test_lossless_uint16_with_nodata_is_bit_exact(spec: dict, s2_like: np.ndarray) -> None:
    decoded = decode_chip(encode_chip(s2_like, CodecSpec(**spec, nodata=0)))
    assert decoded.dtype == s2_like.dtype
    np.testing.assert_array_equal(decoded, s2_like)


def test_h264_lossless_10bit_is_bit_exact(s2_like: np.ndarray) -> None:
    cube = (s2_like // 4).astype(np.uint16)
    np.testing.assert_array_equal(decode_chip(encode_chip(cube, CodecSpec(name="h264", lossless=True))), cube)


@pytest.mark.parametrize("name", ["zstd", "blosc2", "lerc"])
def test_lossless_float32_sar_keeps_nan_and_bits(name: str, sar_like: np.ndarray) -> None:
    spec = CodecSpec(name=name, max_error=0) if name == "lerc" else CodecSpec(name=name)
    decoded = decode_chip(encode_chip(sar_like, spec))
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded.view(np.uint32), sar_like.view(np.uint32))


@pytest.mark.parametrize("name", ["ffv1", "h265", "jpegxl", "zstd"])
@pytest.mark.parametrize("dtype", ["uint8", "int16"])
def test_odd_shapes_and_leading_dims_round_trip(name: str, dtype: str) -> None:
    rng = np.random.default_rng(3)
    info = np.iinfo(dtype)
    lo, hi = (0, 255) if dtype == "uint8" else (-1500, 1500)
    chip = rng.integers(max(lo, info.min), hi, size=(1, 3, 5, 13, 7), dtype=dtype)
    spec = CodecSpec(name=name, lossless=True, bit_depth=12) if name == "h265" else CodecSpec(name=name, lossless=True)
    decoded = decode_chip(encode_chip(chip, spec))
    assert decoded.shape == chip.shape
    np.testing.assert_array_equal(decoded, chip)


@pytest.mark.parametrize(
    ("spec", "min_db"),
    [
        ({"name": "h265", "quality": 18}, 35),
        ({"name": "h264", "quality": 18}, 35),
        ({"name": "av1", "quality": 25}, 35),
        ({"name": "jpegxl", "quality": 0.5}, 35),
        ({"name": "jpeg2000", "quality": 50}, 35),
        ({"name": "htj2k", "quality": 0.01}, 35),
    ],
    ids=lambda s: s["name"] if isinstance(s, dict) else str(s),
)
def test_lossy_quality_and_nodata(spec: dict, min_db: float, s2_like: np.ndarray) -> None:
    payload = encode_chip(s2_like, CodecSpec(**spec, nodata=0))
    decoded = decode_chip(payload)
    assert 8 * len(payload) / s2_like.size < 4.0
    assert psnr(s2_like, decoded, nodata=0) > min_db
    nodata = s2_like == 0
    assert (decoded[nodata] == 0).all()
    assert (decoded[~nodata] != 0).all()


def test_lossy_float_keeps_nan_exactly(sar_like: np.ndarray) -> None:
    decoded = decode_chip(encode_chip(sar_like, CodecSpec(name="h265", quality=10)))
    np.testing.assert_array_equal(np.isnan(decoded), np.isnan(sar_like))
    assert psnr(sar_like, decoded) > 35


def test_lerc_respects_max_error(sar_like: np.ndarray) -> None:
    decoded = decode_chip(encode_chip(sar_like, CodecSpec(name="lerc", max_error=0.05)))
    ok = ~np.isnan(sar_like)
    assert np.abs(decoded[ok] - sar_like[ok]).max() <= 0.05 + 1e-6
    np.testing.assert_array_equal(np.isnan(decoded), ~ok)


@pytest.mark.parametrize("name", ["h265", "jpegxl"])
@pytest.mark.parametrize("target", [0.3, 1.0])
def test_target_bpppb_lands_within_tolerance(name: str, target: float, s2_like: np.ndarray) -> None:
    payload = encode_chip(s2_like, CodecSpec(name=name, target_bpppb=target, nodata=0))
    rate = 8 * len(payload) / s2_like.size
    assert 0.75 * target <= rate <= target


def test_target_psnr_is_reached(s2_like: np.ndarray) -> None:
    payload = encode_chip(s2_like, CodecSpec(name="h265", target_psnr=45, nodata=0))
    assert psnr(s2_like, decode_chip(payload), nodata=0) >= 45


def test_unreachable_targets_raise(s2_like: np.ndarray) -> None:
    with pytest.raises(CodecError, match=r"target_bpppb=1e-05 cannot be met by jpeg2000"):
        encode_chip(s2_like, CodecSpec(name="jpeg2000", target_bpppb=1e-5))
    with pytest.raises(CodecError, match=r"target_psnr=200 dB cannot be met by h264"):
        encode_chip(s2_like, CodecSpec(name="h264", target_psnr=200))


@pytest.mark.parametrize("offset", [0, 5, 40, -3])
def test_corrupt_payload_raises(offset: int, s2_like: np.ndarray) -> None:
    payload = bytearray(encode_chip(s2_like, CodecSpec(name="h265", quality=20)))
    payload[offset] ^= 0x10
    with pytest.raises(CodecError):
        decode_chip(bytes(payload))


def test_checksum_names_the_problem(s2_like: np.ndarray) -> None:
    payload = encode_chip(s2_like, CodecSpec(name="zstd"))
    with pytest.raises(CodecError, match="checksum mismatch"):
        decode_chip(payload[:-1] + bytes([payload[-1] ^ 1]))
    with pytest.raises(CodecError, match="checksum mismatch"):
        decode_chip(payload[:-10])
    with pytest.raises(CodecError, match="not an eoprep chip payload"):
        decode_chip(b"PK\x03\x04" + payload[4:])


def test_bad_inputs_raise_clear_errors(s2_like: np.ndarray) -> None:
    with pytest.raises(CodecError, match="dtype float64 is not supported"):
        encode_chip(s2_like.astype(np.float64), CodecSpec(name="zstd"))
    with pytest.raises(CodecError, match=r"not \(time, band, y, x\)"):
        encode_chip(s2_like[0, 0], CodecSpec(name="zstd"))
    with pytest.raises(CodecError, match="lossless h265 at 8 bits needs each band's value range below 256"):
        encode_chip(s2_like, CodecSpec(name="h265", lossless=True, bit_depth=8))
    with pytest.raises(CodecError, match="float32 chips need zstd, blosc2 or lerc"):
        encode_chip(s2_like.astype(np.float32), CodecSpec(name="ffv1"))


def test_lossy_decode_never_turns_data_into_nodata() -> None:
    # Coarse coding of decorrelated bands lands small values (like S2 SCL classes) on the nodata value 0,
    # in a chip with no nodata pixel (so no mask is stored).
    rng = np.random.default_rng(0)
    edges = rng.choice(np.array([1, 60000]), size=(2, 1, 32, 32))
    classes = rng.integers(1, 5, size=(2, 1, 32, 32))
    chip = np.concatenate([edges, 60001 - edges, classes], axis=1).astype(np.uint16)
    decoded = decode_chip(encode_chip(chip, CodecSpec(name="h265", quality=45, nodata=0)))
    assert (decoded != 0).all()
