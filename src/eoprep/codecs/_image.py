"""Still-image codecs through imagecodecs (JPEG-XL, JPEG 2000, HTJ2K) on one mosaic per chip.

Each chip's planes (bands or KLT components, every time step) are tiled into one grey image, so one
encoder call codes the chip and header overhead is paid once.
"""

from __future__ import annotations

import numpy as np

from ._base import CodecError
from ._planes import tile_frames, untile_frames
from ._spec import CodecSpec

_ALIGN = 1
_FEATURE = {"jpegxl": "JPEGXL", "jpeg2000": "JPEG2K", "htj2k": "HTJ2K"}


def _imagecodecs(name: str):
    try:
        import imagecodecs
    except ImportError as exc:  # pragma: no cover - imagecodecs is a hard dependency
        raise CodecError(f"{name} needs imagecodecs: pip install imagecodecs") from exc
    if not getattr(imagecodecs, _FEATURE[name]).available:
        raise CodecError(f"this imagecodecs build lacks {name}; pip install --upgrade imagecodecs (the PyPI wheel)")
    return imagecodecs


class ImageCodec:
    """JPEG-XL, JPEG 2000 or HTJ2K over (T, C, Y, X) integer codes."""

    coded = True

    def __init__(self, name: str) -> None:
        self.name = name

    def knob_space(self, span: float) -> tuple[float, float, bool, bool]:
        """(best-quality knob, lowest-rate knob, log scale, integer)."""
        return {
            "jpegxl": (0.01, 25.0, True, False),  # butteraugli distance
            "jpeg2000": (110.0, 15.0, False, False),  # target PSNR of the code stream, dB
            "htj2k": (1e-6, 0.5, True, False),  # quantisation step relative to full scale
        }[self.name]

    def default_knob(self) -> float:
        """A visually lossless-ish default."""
        return {"jpegxl": 1.0, "jpeg2000": 60.0, "htj2k": 0.003}[self.name]

    def encode(self, codes: np.ndarray, spec: CodecSpec, knob: float | None) -> tuple[dict, dict[str, bytes]]:
        """Encode the mosaic of ``codes``."""
        ic = _imagecodecs(self.name)
        bit_depth = spec.coded_bit_depth
        image = _mosaic(codes).astype(np.uint8 if bit_depth <= 8 else np.uint16)
        if self.name == "jpegxl":
            effort = spec.level or 5
            if spec.lossless:
                data = ic.jpegxl_encode(image, lossless=True, effort=effort, bitspersample=bit_depth)
            else:
                data = ic.jpegxl_encode(image, distance=knob, effort=effort, bitspersample=bit_depth)
        elif self.name == "jpeg2000":
            level = None if spec.lossless else knob
            data = ic.jpeg2k_encode(image, level, reversible=spec.lossless, bitspersample=bit_depth)
        else:
            data = ic.htj2k_encode(image, None if spec.lossless else knob, reversible=spec.lossless)
        return {"image_shape": list(image.shape)}, {"image": bytes(data)}

    def decode(self, params: dict, sections: dict[str, memoryview], shape: tuple[int, ...]) -> np.ndarray:
        """Decode the mosaic back to (T, C, Y, X) codes."""
        ic = _imagecodecs(self.name)
        decoder = {"jpegxl": ic.jpegxl_decode, "jpeg2000": ic.jpeg2k_decode, "htj2k": ic.htj2k_decode}[self.name]
        try:
            image = decoder(bytes(sections["image"]))
        except Exception as exc:
            raise CodecError(f"{self.name} image does not decode: {exc}") from exc
        if list(image.shape) != params["image_shape"]:
            raise CodecError(f"{self.name} image decoded to shape {image.shape}, expected {params['image_shape']}")
        frames = image.reshape(shape[0], image.shape[0] // shape[0], image.shape[1])
        return untile_frames(frames, shape, _ALIGN)


def _mosaic(codes: np.ndarray) -> np.ndarray:
    frames = tile_frames(codes, _ALIGN)
    return frames.reshape(-1, frames.shape[-1])
