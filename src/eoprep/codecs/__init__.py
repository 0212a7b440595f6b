"""Codec layer: lossless and lossy chip codecs (video over time, per-chunk image/scientific) behind one
interface, with self-describing checksummed payloads and a Zarr v3 codec.

`encode_chip` / `decode_chip` work on (time, band, y, x) chips; `CodecSpec` is the ``output.codec`` part
of a pipeline spec; `zarr_codecs` gives the `zarr.create_array` arguments for a spec.
"""

from __future__ import annotations

from ._api import decode_chip, encode_chip, get_codec
from ._base import SUPPORTED_DTYPES, Codec, CodecError
from ._spec import CodecSpec
from .zarr import EoprepChipCodec, zarr_codecs

__all__ = [
    "SUPPORTED_DTYPES",
    "Codec",
    "CodecError",
    "CodecSpec",
    "EoprepChipCodec",
    "decode_chip",
    "encode_chip",
    "get_codec",
    "zarr_codecs",
]
