"""The chip GeoTIFFs of TACO shards, decoded without GDAL.

Opening a payload with rasterio costs about a millisecond before any pixel is read, and a training
reader opens one per group per sample. The TACO sink writes one layout only (`eoprep.sinks._taco`:
one plane per band, strips or tiles, zstd, horizontal or floating-point predictor), so its blocks are
located from the first IFD and decompressed in one call straight into the output array. Any other
layout gives None and is left to rasterio.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import imagecodecs
import numpy as np

__all__ = ["decode_geotiff"]

_ZSTD = 50000
_WIDTH, _HEIGHT, _BITS, _COMPRESSION, _STRIP_OFFSETS = 256, 257, 258, 259, 273
_SAMPLES, _ROWS_PER_STRIP, _STRIP_COUNTS, _PLANAR, _PREDICTOR = 277, 278, 279, 284, 317
_TILE_WIDTH, _TILE_HEIGHT, _TILE_OFFSETS, _TILE_COUNTS, _SAMPLE_FORMAT = 322, 323, 324, 325, 339
_WANTED = frozenset(
    (_WIDTH, _HEIGHT, _BITS, _COMPRESSION, _STRIP_OFFSETS, _SAMPLES, _ROWS_PER_STRIP, _STRIP_COUNTS)
    + (_PLANAR, _PREDICTOR, _TILE_WIDTH, _TILE_HEIGHT, _TILE_OFFSETS, _TILE_COUNTS, _SAMPLE_FORMAT)
)
_TYPES = {1: "<u1", 3: "<u2", 4: "<u4", 16: "<u8"}  # BYTE, SHORT, LONG, LONG8: the integer tag types
_DTYPES = {
    (fmt, bits): np.dtype(f"<{kind}{bits // 8}") for fmt, kind in ((1, "u"), (2, "i")) for bits in (8, 16, 32, 64)
}
_DTYPES |= {(3, 32): np.dtype("<f4"), (3, 64): np.dtype("<f8")}


def decode_geotiff(data: bytes, shape: tuple[int, ...]) -> np.ndarray | None:
    """Pixels of a payload whose bands make up ``shape`` ``(..., y, x)``; None for a layout we do not write."""
    tags = _first_ifd(data)
    layout = None if tags is None else _Layout.from_tags(tags, shape)
    return None if layout is None else layout.decode(data).reshape(shape)


def _first_ifd(data: bytes) -> dict[int, np.ndarray] | None:
    """The wanted tags of the first IFD of a little-endian classic TIFF or BigTIFF (GDAL writes no other)."""
    if data[:4] == b"II*\x00":
        (ifd,) = struct.unpack_from("<I", data, 4)
        count_format, entry_format, pointer_format = "<H", "<HHI", "<I"
    elif data[:8] == b"II+\x00\x08\x00\x00\x00":
        (ifd,) = struct.unpack_from("<Q", data, 8)
        count_format, entry_format, pointer_format = "<Q", "<HHQ", "<Q"
    else:
        return None
    (n,) = struct.unpack_from(count_format, data, ifd)
    inline = struct.calcsize(pointer_format)
    entry_size = struct.calcsize(entry_format) + inline
    first = ifd + struct.calcsize(count_format)
    tags = {}
    for start in range(first, first + n * entry_size, entry_size):
        tag, kind, count = struct.unpack_from(entry_format, data, start)
        if tag not in _WANTED:
            continue
        if kind not in _TYPES:
            return None
        dtype = np.dtype(_TYPES[kind])
        at = start + entry_size - inline
        if count * dtype.itemsize > inline:
            (at,) = struct.unpack_from(pointer_format, data, at)
        tags[tag] = np.frombuffer(data, dtype=dtype, count=count, offset=at)
    return tags


@dataclass(frozen=True)
class _Layout:
    """Where the compressed blocks of a band-separate zstd image are, and how to undo its predictor.

    GDAL writes the blocks back to back, plane by plane: tiles in row-major order (padded to full
    tiles at the right and bottom edges), or strips as wide as the image, the last one holding only
    the remaining rows. Back to back, the blocks' zstd frames decompress in one call, which saves
    the per-call decoder set-up that otherwise costs more than a small block's decompression.
    """

    dtype: np.dtype
    planes: int
    height: int
    width: int
    block_height: int
    block_width: int
    predictor: int
    start: int
    end: int

    @classmethod
    def from_tags(cls, tags: dict[int, np.ndarray], shape: tuple[int, ...]) -> _Layout | None:
        def one(tag: int, default: int | None = None) -> int | None:
            values = tags.get(tag)
            if values is None:
                return default
            return int(values[0]) if len(values) and (values == values[0]).all() else None

        height, width, planes = one(_HEIGHT), one(_WIDTH), one(_SAMPLES, 1)
        dtype = _DTYPES.get((one(_SAMPLE_FORMAT, 1), one(_BITS, 1)))
        predictor = one(_PREDICTOR, 1)
        if (
            dtype is None
            or one(_COMPRESSION) != _ZSTD
            or (planes != 1 and one(_PLANAR, 1) != 2)
            or predictor not in (1, 2 if dtype.kind in "iu" else 3)
            or (planes, height, width) != (math.prod(shape[:-2]), *shape[-2:])
        ):
            return None
        if _TILE_OFFSETS in tags:
            block_height, block_width = one(_TILE_HEIGHT), one(_TILE_WIDTH)
            offsets, counts = tags[_TILE_OFFSETS], tags.get(_TILE_COUNTS)
            if not block_height or not block_width:
                return None
            per_plane = -(-height // block_height) * -(-width // block_width)
        else:
            # a plane's strips decompress, back to back, into the whole plane: one block
            block_height, block_width = height, width
            offsets, counts = tags.get(_STRIP_OFFSETS), tags.get(_STRIP_COUNTS)
            rows_per_strip = one(_ROWS_PER_STRIP, height)
            if not rows_per_strip:
                return None
            per_plane = -(-height // rows_per_strip)
        if offsets is None or counts is None or not len(offsets) == len(counts) == planes * per_plane:
            return None
        if not counts.all() or (offsets[1:] != offsets[:-1] + counts[:-1]).any():
            return None  # sparse blocks (nodata that GDAL fills in) or blocks out of order
        return cls(
            dtype,
            planes,
            height,
            width,
            block_height,
            block_width,
            predictor,
            int(offsets[0]),
            int(offsets[-1] + counts[-1]),
        )

    def decode(self, data: bytes) -> np.ndarray:
        """``(planes, height, width)``: all blocks decompressed in one call, the predictor undone on all at once."""
        rows, cols = -(-self.height // self.block_height), -(-self.width // self.block_width)
        blocks = np.empty((self.planes, rows, cols, self.block_height, self.block_width), self.dtype)
        decoded = imagecodecs.zstd_decode(
            memoryview(data)[self.start : self.end], out=blocks.reshape(-1).view(np.uint8)
        )
        if len(decoded) != blocks.nbytes:
            raise ValueError(f"the image's blocks decompress to {len(decoded)} bytes instead of {blocks.nbytes}")
        if self.predictor == 2:
            imagecodecs.delta_decode(blocks, axis=-1, out=blocks)
        elif self.predictor == 3:
            _undo_float_predictor(blocks)
        image = blocks.transpose(0, 1, 3, 2, 4).reshape(self.planes, rows * self.block_height, -1)
        return np.ascontiguousarray(image[:, : self.height, : self.width])


def _undo_float_predictor(blocks: np.ndarray) -> None:
    """TIFF predictor 3, in place: each row's bytes differenced, grouped by significance, most significant first.

    A byte-wise delta, then each plane's bytes regrouped into little-endian values from a plane-sized
    copy: several times faster than ``imagecodecs.floatpred_decode``, and no image-sized temporary,
    whose fresh pages cost more to fault in than the regrouping itself.
    """
    size, width = blocks.dtype.itemsize, blocks.shape[-1]
    raw = blocks.view(np.uint8)
    imagecodecs.delta_decode(raw, axis=-1, out=raw)
    for plane in raw.reshape(len(blocks), -1, width * size):
        grouped = plane.reshape(-1, size, width).copy()
        values = plane.reshape(-1, width, size)
        for byte in range(size):
            values[..., byte] = grouped[:, size - 1 - byte, :]
