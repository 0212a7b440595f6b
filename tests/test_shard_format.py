"""Our direct shard encoding and decoding agree with zarr's sharding codec, for every chain we accept."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from eoprep.codecs import CodecSpec, EoprepChipCodec
from eoprep.shard_format import EMPTY, ShardFormat


def _chip_codec(**spec):
    return {"serializer": EoprepChipCodec(spec=CodecSpec(**spec)), "compressors": ()}


CHAINS = [
    ("uint16", {"compressors": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]}),
    ("uint16", {"compressors": [ZstdCodec(level=3)]}),
    ("float32", {"compressors": [BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle")]}),
    ("int16", {"compressors": [GzipCodec(level=1)]}),
    ("uint8", {"compressors": None}),
    ("uint16", _chip_codec(name="lerc", max_error=0)),  # our own codec: lossless
    ("uint16", _chip_codec(name="lerc", max_error=3)),  # and lossy, the fill value kept as nodata
    ("float32", _chip_codec(name="lerc", max_error=4.0)),
]
LOSSY = [
    (dtype, codecs)
    for dtype, codecs in CHAINS
    if "serializer" in codecs and (codecs["serializer"].spec.max_error or 0) > 0
]


def _array(path, dtype, codecs, shape=(7, 3, 2, 16, 16), per_shard=4):
    fill = np.nan if np.dtype(dtype).kind == "f" else 7
    return zarr.create_array(
        path,
        shape=shape,
        dtype=dtype,
        chunks=(1, *shape[1:]),
        shards=(per_shard, *shape[1:]),
        fill_value=fill,
        **codecs,
    )


def _data(arr):
    data = np.random.default_rng(0).integers(0, 200, arr.shape).astype(arr.dtype)
    data[2] = arr.fill_value  # a chip of fill values only: not stored, read back as fill
    return data


@pytest.mark.parametrize(("dtype", "codecs"), CHAINS)
def test_decoding_chips_matches_zarr(tmp_path, dtype, codecs):
    arr = _array(tmp_path / "a.zarr", dtype, codecs)
    arr[:] = _data(arr)
    fmt = ShardFormat.from_metadata(arr.metadata.to_dict(), arr.fill_value)
    assert fmt is not None and fmt.chips == 4
    for position in range(arr.shape[0]):
        raw = (tmp_path / "a.zarr" / "c" / str(position // 4) / "0" / "0" / "0" / "0").read_bytes()
        offset, nbytes = fmt.shard_index(raw[-fmt.index_nbytes :])[position % 4]
        out = np.empty(fmt.shape, dtype=fmt.dtype)
        if offset == EMPTY:
            out.fill(fmt.fill_value)
        else:
            fmt.decode(raw[offset : offset + nbytes], out)
        assert out.tobytes() == np.asarray(arr[position]).tobytes()


@pytest.mark.parametrize(("dtype", "codecs"), CHAINS)
def test_reading_some_chips_of_a_shard_into_a_buffer_matches_zarr(tmp_path, dtype, codecs):
    import fsspec

    arr = _array(tmp_path / "a.zarr", dtype, codecs)
    arr[:] = _data(arr)
    fmt = ShardFormat.from_metadata(arr.metadata.to_dict(), arr.fill_value)
    fs = fsspec.filesystem("file")
    for shard, indices in ((0, [3, 0, 2]), (0, [2]), (1, [0, 1, 2]), (1, [1])):  # any order, a fill chip alone
        out = np.zeros((len(indices), *fmt.shape), dtype=fmt.dtype)
        fmt.read_chips(fs, str(tmp_path / "a.zarr" / "c" / str(shard) / "0/0/0/0"), indices, out)
        expected = np.stack([np.asarray(arr[shard * 4 + i]) for i in indices])
        assert out.tobytes() == expected.tobytes()


def test_reading_chips_from_a_truncated_shard_fails(tmp_path):
    import fsspec

    arr = _array(tmp_path / "a.zarr", "uint16", {"compressors": None})
    arr[:] = _data(arr)
    fmt = ShardFormat.from_metadata(arr.metadata.to_dict(), arr.fill_value)
    path = tmp_path / "a.zarr" / "c" / "0" / "0" / "0" / "0" / "0"
    raw = path.read_bytes()
    index_at = len(raw) - fmt.index_nbytes
    path.write_bytes(raw[:1000] + raw[index_at:])  # the chunks cut, the index kept
    with pytest.raises(ValueError, match="end after the end of the shard"):
        fmt.read_chips(fsspec.filesystem("file"), str(path), [0, 1], np.empty((2, *fmt.shape), dtype=fmt.dtype))


@pytest.mark.parametrize(("dtype", "codecs"), CHAINS)
def test_encoded_shards_read_back_through_zarr(tmp_path, dtype, codecs):
    """Read back through zarr, our shards give what zarr's own round trip gives (the data, when lossless)."""
    arr = _array(tmp_path / "a.zarr", dtype, codecs)
    data = _data(arr)
    reference = _array(tmp_path / "ref.zarr", dtype, codecs)
    reference[:] = data
    fmt = ShardFormat.from_metadata(arr.metadata.to_dict(), arr.fill_value)
    for shard_no, start in enumerate(range(0, arr.shape[0], 4)):  # the last shard is partial: 3 of 4 chips
        blob = fmt.encode(data[start : start + 4])
        key = arr.metadata.encode_chunk_key((shard_no, 0, 0, 0, 0))
        sync(arr.store.set(key, default_buffer_prototype().buffer.from_bytes(blob)))
    back = zarr.open_array(tmp_path / "a.zarr", mode="r")[:]
    assert back.tobytes() == reference[:].tobytes()
    assert (back.tobytes() == data.tobytes()) == ((dtype, codecs) not in LOSSY)


def test_a_shard_of_fill_values_is_not_stored(tmp_path):
    arr = _array(tmp_path / "a.zarr", "uint16", {"compressors": None})
    fmt = ShardFormat.from_metadata(arr.metadata.to_dict(), arr.fill_value)
    assert fmt.encode(np.full((4, *arr.shape[1:]), 7, dtype="uint16")) is None


def test_other_layouts_are_left_to_zarr(tmp_path):
    plain = zarr.create_array(tmp_path / "p.zarr", shape=(4, 8), dtype="uint16", chunks=(1, 8))
    assert ShardFormat.from_metadata(plain.metadata.to_dict(), plain.fill_value) is None
    wide = zarr.create_array(tmp_path / "w.zarr", shape=(4, 8), dtype="uint16", chunks=(2, 8), shards=(4, 8))
    assert ShardFormat.from_metadata(wide.metadata.to_dict(), wide.fill_value) is None


def test_a_damaged_shard_index_is_refused(tmp_path):
    arr = zarr.create_array(tmp_path / "a.zarr", shape=(4, 8), dtype="uint16", chunks=(1, 8), shards=(4, 8))
    arr[:] = 3
    fmt = ShardFormat.from_metadata(arr.metadata.to_dict(), arr.fill_value)
    raw = bytearray((tmp_path / "a.zarr" / "c" / "0" / "0").read_bytes())
    raw[-10] ^= 0xFF
    with pytest.raises(ValueError, match="CRC32C"):
        fmt.shard_index(bytes(raw[-fmt.index_nbytes :]))


def _pixels(url):
    shape = (7, 3, 2, 16, 16)
    return zarr.create_array(
        url,
        name="g/pixels",
        shape=shape,
        dtype="uint16",
        chunks=(1, *shape[1:]),
        shards=(4, *shape[1:]),
        fill_value=7,
        compressors=[BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
    )


@pytest.mark.parametrize("direct_io", [False, True])
def test_shard_writer_takes_chips_one_by_one_from_a_reused_buffer(tmp_path, direct_io):
    from eoprep.sinks import ShardWriter

    url = str(tmp_path / "s.zarr")
    arr = _pixels(url)
    data = _data(arr)
    buffer = np.empty(arr.shape[1:], dtype="uint16")
    whole = ShardWriter(url, "g", [0, 1, 2, 3], direct_io=direct_io)
    partial = ShardWriter(url, "g", [4, 6], direct_io=direct_io)  # shard 1 holds 4..6: a gap at 5
    for writer, positions in ((whole, [3, 1, 0, 2]), (partial, [6, 4])):
        for position in positions:
            buffer[...] = data[position]
            writer.add(position, buffer)
    assert (arr[:] == 7).all(), "written before close"
    assert whole.close() > 0 and partial.close() > 0
    np.testing.assert_array_equal(arr[:4], data[:4])
    np.testing.assert_array_equal(arr[4], data[4])
    np.testing.assert_array_equal(arr[6], data[6])
    assert (arr[5] == 7).all()

    short = ShardWriter(url, "g", [0, 1, 2, 3])
    short.add(0, data[1])
    with pytest.raises(ValueError, match=r"\[1, 2, 3\] were never added"):
        short.close()
    np.testing.assert_array_equal(arr[:4], data[:4])


def test_a_shard_written_past_the_page_cache_is_the_object_zarr_writes(tmp_path):
    from eoprep.sinks import ShardWriter

    shards = []
    for direct_io in (False, True):
        url = str(tmp_path / f"{direct_io}.zarr")
        data = _data(_pixels(url))
        writer = ShardWriter(url, "g", [0, 1, 2, 3], direct_io=direct_io)
        for position in range(4):
            writer.add(position, data[position])
        assert writer.close() == (tmp_path / f"{direct_io}.zarr/g/pixels/c/0/0/0/0/0").stat().st_size
        shards.append((tmp_path / f"{direct_io}.zarr/g/pixels/c/0/0/0/0/0").read_bytes())
    assert shards[0] == shards[1]


def test_consecutive_runs():
    from eoprep.sinks import consecutive_runs

    assert consecutive_runs([4, 5, 6, 9, 11, 12]) == [range(4, 7), range(9, 10), range(11, 13)]
    assert consecutive_runs([3, 2]) == [range(3, 4), range(2, 3)]  # order kept
    assert consecutive_runs([]) == []
