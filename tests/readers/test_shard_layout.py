"""The readers' direct shard decoding gives what zarr gives, for every codec chain it accepts."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

from eoprep.readers._sources import _ShardLayout


@pytest.mark.parametrize(
    ("dtype", "compressors"),
    [
        ("uint16", [ZstdCodec(level=3)]),
        ("float32", [BloscCodec(cname="lz4", shuffle="shuffle")]),
        ("int16", [GzipCodec(level=1)]),
        ("uint8", None),
    ],
)
def test_direct_reads_match_zarr(tmp_path, dtype, compressors):
    shape, per_shard = (6, 3, 2, 16, 16), 4
    arr = zarr.create_array(
        tmp_path / "a.zarr",
        shape=shape,
        dtype=dtype,
        chunks=(1, *shape[1:]),
        shards=(per_shard, *shape[1:]),
        compressors=compressors,
        fill_value=7,
    )
    data = np.random.default_rng(0).integers(0, 200, shape).astype(dtype)
    data[2] = 7  # a chunk of fill values only: not stored, read back as fill
    arr[:] = data
    layout = _ShardLayout.from_metadata(arr.metadata.to_dict(), arr.fill_value)
    assert layout is not None and layout.chips == per_shard
    for position in range(shape[0]):
        shard = tmp_path / "a.zarr" / "c" / str(position // per_shard) / "0" / "0" / "0" / "0"
        raw = shard.read_bytes()
        offset, nbytes = layout.shard_index(raw[-layout.index_nbytes :])[position % per_shard]
        out = np.empty(layout.shape, dtype=layout.dtype)
        if offset == 2**64 - 1:
            out.fill(layout.fill_value)
        else:
            layout.decode(raw[offset : offset + nbytes], out)
        assert out.tobytes() == np.asarray(arr[position]).tobytes()


def test_other_layouts_are_left_to_zarr(tmp_path):
    plain = zarr.create_array(tmp_path / "p.zarr", shape=(4, 8), dtype="uint16", chunks=(1, 8))
    assert _ShardLayout.from_metadata(plain.metadata.to_dict(), plain.fill_value) is None
    wide = zarr.create_array(tmp_path / "w.zarr", shape=(4, 8), dtype="uint16", chunks=(2, 8), shards=(4, 8))
    assert _ShardLayout.from_metadata(wide.metadata.to_dict(), wide.fill_value) is None


def test_a_damaged_shard_index_is_refused(tmp_path):
    arr = zarr.create_array(tmp_path / "a.zarr", shape=(4, 8), dtype="uint16", chunks=(1, 8), shards=(4, 8))
    arr[:] = 3
    layout = _ShardLayout.from_metadata(arr.metadata.to_dict(), arr.fill_value)
    raw = bytearray((tmp_path / "a.zarr" / "c" / "0" / "0").read_bytes())
    raw[-10] ^= 0xFF
    with pytest.raises(ValueError, match="CRC32C"):
        layout.shard_index(bytes(raw[-layout.index_nbytes :]))
