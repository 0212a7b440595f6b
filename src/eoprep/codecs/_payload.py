"""Self-describing chip payloads: a checksummed header plus named byte sections.

Layout: ``b"EOPC"`` | format version (u8) | CRC-32 of everything after it (u32 LE) | header length (u32 LE)
| header (UTF-8 JSON) | sections in header order. The checksum covers header and sections, so a truncated
or modified chunk is refused instead of decoding to wrong pixels.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

import imagecodecs
import numpy as np

from ._base import CodecError

MAGIC = b"EOPC"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sBII")

#: zlib's CRC-32, computed about ten times faster: a lossy S2 chip decodes in about 2 ms, zlib's took 0.2 ms of it
_crc32 = imagecodecs.deflate_crc32


def pack_payload(header: dict[str, Any], sections: dict[str, bytes]) -> bytes:
    """Serialise ``header`` and ``sections`` into one checksummed payload."""
    head = dict(header, sections={k: len(v) for k, v in sections.items()})
    head_bytes = json.dumps(head, separators=(",", ":")).encode()
    body = head_bytes + b"".join(sections.values())
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, _crc32(body), len(head_bytes)) + body


def unpack_payload(payload: bytes | bytearray | memoryview) -> tuple[dict[str, Any], dict[str, memoryview]]:
    """Check and split a payload into its header and sections; raise `CodecError` on any damage."""
    view = memoryview(payload).cast("B")
    if len(view) < _PREFIX.size:
        raise CodecError(f"chip payload is {len(view)} bytes, shorter than the {_PREFIX.size}-byte prefix")
    magic, version, crc, head_len = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CodecError(f"not an eoprep chip payload (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise CodecError(
            f"chip payload format version {version} is not supported by this eoprep "
            f"(reads version {FORMAT_VERSION}); upgrade eoprep"
        )
    body = view[_PREFIX.size :]
    actual = _crc32(body)
    if actual != crc:
        raise CodecError(
            f"chip payload checksum mismatch (stored {crc:#010x}, computed {actual:#010x}): the chunk is "
            "corrupt or truncated; rewrite it from the source"
        )
    try:
        header = json.loads(bytes(body[:head_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CodecError(f"chip payload header is not valid JSON: {exc}") from exc
    sections: dict[str, memoryview] = {}
    pos = head_len
    for name, size in header["sections"].items():
        sections[name] = body[pos : pos + size]
        pos += size
    if pos != len(body):
        raise CodecError(f"chip payload sections add up to {pos} bytes but the body has {len(body)}")
    return header, sections


def pack_mask(mask: np.ndarray) -> bytes:
    """Store a boolean mask losslessly and compactly (bit-packed, then zlib)."""
    return zlib.compress(np.packbits(mask.ravel()).tobytes(), 6)


def unpack_mask(data: memoryview, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `pack_mask`."""
    bits = np.frombuffer(zlib.decompress(data), dtype=np.uint8)
    return np.unpackbits(bits, count=int(np.prod(shape))).astype(bool).reshape(shape)
