"""Codecs on the chip's own values: zstd and blosc2 (lossless bytes) and LERC (max-error bounded)."""

from __future__ import annotations

import numpy as np

from ._base import CodecError
from ._spec import CodecSpec


def _imagecodecs(what: str):
    try:
        import imagecodecs
    except ImportError as exc:  # pragma: no cover - imagecodecs is a hard dependency
        raise CodecError(f"{what} needs imagecodecs: pip install imagecodecs") from exc
    return imagecodecs


class BytesCodec:
    """zstd or blosc2 on the raw little-endian bytes; exact for every dtype, NaN included."""

    coded = False

    def __init__(self, name: str) -> None:
        self.name = name

    def encode(self, chip: np.ndarray, spec: CodecSpec, knob: float | None) -> tuple[dict, dict[str, bytes]]:
        """Compress the chip's bytes (blosc2 with byte shuffle, typesize = itemsize)."""
        ic = _imagecodecs(self.name)
        raw = np.ascontiguousarray(chip, dtype=chip.dtype.newbyteorder("<"))
        if self.name == "zstd":
            data = ic.zstd_encode(raw.tobytes(), spec.level or 3)
        else:
            data = ic.blosc2_encode(
                raw.tobytes(),
                spec.level or 5,
                compressor="zstd",
                shuffle="shuffle",
                typesize=raw.dtype.itemsize,
                numthreads=1,
            )
        return {}, {"bytes": bytes(data)}

    def decode(self, params: dict, sections: dict[str, memoryview], shape: tuple[int, ...]) -> np.ndarray:
        """Decompress to a flat byte buffer; the caller views it with the stored dtype."""
        ic = _imagecodecs(self.name)
        decoder = ic.zstd_decode if self.name == "zstd" else ic.blosc2_decode
        try:
            return np.frombuffer(bytearray(decoder(bytes(sections["bytes"]))), dtype=np.uint8)
        except Exception as exc:
            raise CodecError(f"{self.name} data do not decode: {exc}") from exc


class LercCodec:
    """LERC with a maximum absolute error in data units (0 = lossless)."""

    coded = False
    name = "lerc"

    def knob_space(self, span: float) -> tuple[float, float, bool, bool]:
        """(best-quality knob, lowest-rate knob, log scale, integer) for data spanning ``span``."""
        return (1e-6 * span, 0.5 * span, True, False)

    def default_knob(self) -> float:
        """Lossless unless a max error is given."""
        return 0.0

    def encode(self, chip: np.ndarray, spec: CodecSpec, knob: float | None) -> tuple[dict, dict[str, bytes]]:
        """Encode the (T*B*Y, X) mosaic; ``knob`` is the max error in data units."""
        ic = _imagecodecs("lerc")
        t, b, y, x = chip.shape
        data = ic.lerc_encode(np.ascontiguousarray(chip.reshape(t * b * y, x)), float(knob or 0.0))
        return {"max_error": float(knob or 0.0)}, {"lerc": bytes(data)}

    def decode(self, params: dict, sections: dict[str, memoryview], shape: tuple[int, ...]) -> np.ndarray:
        """Decode to the chip's dtype and shape."""
        ic = _imagecodecs("lerc")
        try:
            return ic.lerc_decode(bytes(sections["lerc"])).reshape(shape)
        except Exception as exc:
            raise CodecError(f"lerc data do not decode: {exc}") from exc
