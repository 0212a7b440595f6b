"""The shard objects of our pixel arrays, encoded and decoded without zarr's general machinery.

Our pixel arrays have one chip per inner chunk and the shard index at the end, with a plain
``bytes`` serializer and at most one standard compressor, or our own ``eoprep.chip`` codec
(`eoprep.codecs`) alone. For that layout, cutting one chip out of a shard (readers, once per
sample) or encoding a whole shard (workers, once per shard) is a few lines; zarr's general path
costs more than the decode or the encode itself (a LERC chip: 9 ms per sample through zarr, 2.5 ms
here). Anything else (other codecs, big-endian data, other chunkings) is left to zarr, and both
paths write and read the same bytes as zarr's sharding codec specifies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from eoprep.codecs import CodecSpec, decode_chip, encode_chip
from eoprep.codecs.zarr import CODEC_ID

__all__ = ["EMPTY", "ShardFormat"]

#: Index entry (offset and size) of an inner chunk that is not stored: it reads as fill values.
EMPTY = np.uint64(2**64 - 1)


@dataclass(frozen=True)
class ShardFormat:
    """Chips per shard, one chip's shape and dtype, the fill value and the compressor of a pixel array."""

    chips: int
    shape: tuple[int, ...]
    dtype: np.dtype
    fill_value: Any
    compressor: Any

    @property
    def index_nbytes(self) -> int:
        return 16 * self.chips + 4

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], fill_value: Any) -> ShardFormat | None:
        """The format of an array from its ``zarr.json`` metadata, or None when zarr must handle it."""
        import numcodecs

        codecs = meta.get("codecs", [])
        if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
            return None
        conf = codecs[0]["configuration"]
        shard_shape = meta["chunk_grid"]["configuration"]["chunk_shape"]
        inner = conf["chunk_shape"]
        index_codecs = [c.get("name") for c in conf.get("index_codecs", [])]
        chain = conf["codecs"]
        if (
            conf.get("index_location", "end") != "end"
            or index_codecs != ["bytes", "crc32c"]
            or inner[0] != 1
            or list(shard_shape[1:]) != list(inner[1:])
            or not chain
            or len(chain) > 2
        ):
            return None
        if chain[0].get("name") == CODEC_ID and len(chain) == 1:
            codec = _ChipCodec.from_config(chain[0].get("configuration", {}), fill_value)
            return cls(int(shard_shape[0]), tuple(inner[1:]), np.dtype(meta["data_type"]), fill_value, codec)
        if chain[0].get("name") != "bytes":
            return None
        endian = "<" if chain[0].get("configuration", {}).get("endian", "little") == "little" else ">"
        compressor = None
        if len(chain) == 2:
            name, options = chain[1].get("name"), dict(chain[1].get("configuration", {}))
            if name == "zstd":
                compressor = numcodecs.Zstd(level=options.get("level", 0), checksum=options.get("checksum", False))
            elif name == "blosc":
                shuffles = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}
                compressor = numcodecs.Blosc(
                    cname=options.get("cname", "lz4"),
                    clevel=options.get("clevel", 5),
                    shuffle=shuffles.get(options.get("shuffle", "shuffle"), 1),
                    blocksize=options.get("blocksize", 0),
                )
            elif name == "gzip":
                compressor = numcodecs.GZip(level=options.get("level", 5))
            else:
                return None
        dtype = np.dtype(meta["data_type"]).newbyteorder(endian)
        if not dtype.isnative:
            return None
        return cls(int(shard_shape[0]), tuple(inner[1:]), dtype, fill_value, compressor)

    def shard_index(self, tail: bytes) -> np.ndarray:
        """``(offset, nbytes)`` of each inner chunk, checked against the index's CRC32C."""
        import google_crc32c

        body, checksum = tail[:-4], tail[-4:]
        if len(tail) != self.index_nbytes or google_crc32c.value(body).to_bytes(4, "little") != checksum:
            raise ValueError("the shard index fails its CRC32C check (truncated or overwritten shard)")
        return np.frombuffer(body, dtype="<u8").reshape(self.chips, 2)

    def decode(self, data: bytes | memoryview, out: np.ndarray) -> None:
        """Decode one stored inner chunk into ``out`` (shape `shape`, dtype `dtype`)."""
        if self.compressor is None:
            out.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, dtype=np.uint8)
        else:
            self.compressor.decode(data, out=out)

    def read_chips(
        self, fs: Any, path: str, indices: Sequence[int], out: np.ndarray, index: np.ndarray | None = None
    ) -> None:
        """Decode the chips at ``indices`` (positions in the shard object at ``path``) into ``out[k]``.

        Two reads per shard (its index, unless the caller kept it from `shard_index`, then the span of bytes
        the chips occupy) and a decode straight into the caller's buffer, e.g. pinned memory that a GPU
        copies from: zarr's path reads chunk by chunk and copies every chip out of its own output array
        (1.1k chips/s on one core, this 1.5k).
        """
        if index is None:
            index = self.shard_index(fs.cat_file(path, start=-self.index_nbytes))
        where = index[list(indices)]
        stored = where[:, 0] != EMPTY
        start = int(where[stored, 0].min()) if stored.any() else 0
        end = int((where[stored, 0] + where[stored, 1]).max()) if stored.any() else 0
        data = memoryview(fs.cat_file(path, start=start, end=end)) if end > start else memoryview(b"")
        if len(data) != end - start:
            raise ValueError(f"the chunks end after the end of the shard ({len(data)} of {end - start} bytes)")
        for k, (offset, nbytes) in enumerate(where.tolist()):
            if offset == int(EMPTY):
                out[k].fill(self.fill_value)
            else:
                self.decode(data[offset - start : offset - start + nbytes], out[k])

    def encode(self, chips: Sequence[np.ndarray]) -> bytes | None:
        """A whole shard object for ``chips`` (at most `chips` of them, in position order).

        Chips made of fill values only are not stored, as zarr does; None when no chip is stored,
        i.e. the shard object should not exist.
        """
        return self.assemble([self.encode_chip(chip) for chip in chips])

    def encode_chip(self, chip: np.ndarray) -> bytes | None:
        """One inner chunk as stored, or None for a chip of fill values only (not stored)."""
        if self._all_fill(chip):
            return None
        chip = np.ascontiguousarray(chip, dtype=self.dtype)
        return chip.tobytes() if self.compressor is None else bytes(self.compressor.encode(chip))

    def assemble(self, payloads: Sequence[bytes | None]) -> bytes | None:
        """The shard object from its chips' `encode_chip` payloads in position order (None: not stored)."""
        parts = self.parts(payloads)
        return None if parts is None else b"".join(parts)

    def parts(self, payloads: Sequence[bytes | None]) -> list[bytes] | None:
        """The pieces of `assemble`'s object, in order, for a writer that copies them out itself."""
        import google_crc32c

        index = np.full((self.chips, 2), EMPTY, dtype="<u8")
        parts: list[bytes] = []
        offset = 0
        for j, payload in enumerate(payloads):
            if payload is None:
                continue
            index[j] = (offset, len(payload))
            parts.append(payload)
            offset += len(payload)
        if not parts:
            return None
        body = index.tobytes()
        return [*parts, body, google_crc32c.value(body).to_bytes(4, "little")]

    def _all_fill(self, chip: np.ndarray) -> bool:
        fill = self.fill_value
        nan = isinstance(fill, float | np.floating) and np.isnan(fill)
        first = chip.flat[0] if chip.size else fill
        if not (np.isnan(first) if nan else first == fill):
            return False  # most chips: settled by one pixel, not a pass over the whole chip
        return bool(np.isnan(chip).all() if nan else (chip == fill).all())


@dataclass(frozen=True)
class _ChipCodec:
    """The ``eoprep.chip`` codec behind numcodecs' ``encode``/``decode(out=)`` interface, as zarr applies it."""

    spec: CodecSpec
    nodata: float | None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], fill_value: Any) -> _ChipCodec:
        spec = CodecSpec.model_validate(config.get("spec", {}))
        nodata = spec.nodata if spec.nodata is not None or fill_value is None else float(fill_value)
        return cls(spec, nodata)

    def encode(self, chip: np.ndarray) -> bytes:
        return encode_chip(chip, self.spec, nodata=self.nodata)

    def decode(self, data: bytes, out: np.ndarray) -> None:
        chip = decode_chip(data)
        if chip.size != out.size:
            raise ValueError(f"eoprep chunk holds shape {chip.shape}, the array expects {out.shape}")
        out[...] = chip.reshape(out.shape)
