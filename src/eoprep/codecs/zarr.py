"""Zarr v3 integration: `EoprepChipCodec` (an array→bytes codec, registered under the ``zarr.codecs``
entry point as ``eoprep.chip``) and `zarr_codecs`, the `zarr.create_array` arguments for a `CodecSpec`.

Each chunk handed to the codec is one chip, shaped (1, time, band, y, x) as the inner chunk of a
``ShardingCodec``; the payload is self-describing, so the array metadata only needs the spec. Unless the
spec sets ``nodata``, the array's fill value is the nodata value lossy codecs keep exactly (eoprep stores
write nodata as the fill value).

Reading without eoprep: zarr-python (3.1) resolves codec names only through its registry and reports a
missing one as ``UnknownCodecError: Unknown codec: 'eoprep.chip'``. That message is built from the codec
name alone; zarr has no metadata field for an install hint (``must_understand: false`` marks optional
top-level extensions, and a codec can never be optional), and no code of ours runs when eoprep is absent.
So the hint is the name itself: like numcodecs' ``numcodecs.<codec>`` ids, ``eoprep.chip`` starts with
the package that provides it (``pip install eoprep``), and ``tests/codecs/test_zarr.py`` checks that the
error shows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.codecs import BytesCodec, ZstdCodec
from zarr.core.common import parse_named_configuration

from ._api import decode_chip, encode_chip
from ._base import SUPPORTED_DTYPES, CodecError
from ._spec import CodecSpec

if TYPE_CHECKING:
    from typing import Self

    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer, NDBuffer

__all__ = ["CODEC_ID", "EoprepChipCodec", "zarr_codecs"]

CODEC_ID = "eoprep.chip"


@dataclass(frozen=True)
class EoprepChipCodec(ArrayBytesCodec):
    """Zarr v3 array→bytes codec that stores each chunk with `encode_chip`.

    Parameters
    ----------
    spec
        The codec spec (or its dict form, as read from ``zarr.json``).
    """

    is_fixed_size = False

    spec: CodecSpec

    def __init__(self, *, spec: CodecSpec | dict[str, Any]) -> None:
        object.__setattr__(self, "spec", spec if isinstance(spec, CodecSpec) else CodecSpec.model_validate(spec))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Build from the ``{"name": "eoprep.chip", "configuration": {"spec": ...}}`` metadata form."""
        _, config = parse_named_configuration(data, CODEC_ID)
        return cls(**config)

    def to_dict(self) -> dict[str, Any]:
        """JSON form stored in the array metadata."""
        return {"name": CODEC_ID, "configuration": {"spec": self.spec.model_dump(exclude_defaults=True)}}

    def validate(self, *, shape: tuple[int, ...], dtype: Any, chunk_grid: Any) -> None:
        """Refuse dtypes the chip codecs cannot store, when the array is created rather than at write time."""
        _check_dtype(self.spec, np.dtype(dtype.to_native_dtype()))

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        chip = decode_chip(chunk_bytes.as_numpy_array())
        if chip.size != int(np.prod(chunk_spec.shape)):
            raise CodecError(f"eoprep chunk holds shape {chip.shape}, the array expects {chunk_spec.shape}")
        return chunk_spec.prototype.nd_buffer.from_numpy_array(chip.reshape(chunk_spec.shape))

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        nodata = self.spec.nodata
        if nodata is None and chunk_spec.fill_value is not None:
            nodata = float(chunk_spec.fill_value)
        payload = encode_chip(chunk_array.as_numpy_array(), self.spec, nodata=nodata)
        return chunk_spec.prototype.buffer.from_bytes(payload)

    def compute_encoded_size(self, input_byte_length: int, _chunk_spec: ArraySpec) -> int:
        """Encoded size is data dependent."""
        raise NotImplementedError


def _check_dtype(spec: CodecSpec, dtype: np.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise CodecError(f"codec {spec.name!r} cannot store dtype {dtype}; use one of {names}")
    lossless_ints_only = spec.lossless and spec.name not in ("zstd", "blosc2", "lerc")
    if lossless_ints_only and dtype.kind == "f":
        raise CodecError(
            f"lossless {spec.name} codes integers only; store {dtype} with zstd, blosc2 or lerc (max_error: 0)"
        )


def zarr_codecs(spec: CodecSpec, dtype: np.dtype | str) -> dict[str, Any]:
    """`zarr.create_array` keyword arguments that store chunks with ``spec``.

    Plain lossless zstd uses zarr's own ``bytes`` + ``zstd`` codecs (level 3 unless set), so such stores
    open without eoprep; every other spec uses `EoprepChipCodec` with no extra compressor.

    Parameters
    ----------
    spec
        Codec spec.
    dtype
        Array dtype, checked against what the codec can store.

    Returns
    -------
    dict
        ``{"serializer": ..., "compressors": ...}``.
    """
    _check_dtype(spec, np.dtype(dtype))
    if spec.name == "zstd":
        return {"serializer": BytesCodec(), "compressors": (ZstdCodec(level=spec.level or 3),)}
    return {"serializer": EoprepChipCodec(spec=spec), "compressors": ()}
