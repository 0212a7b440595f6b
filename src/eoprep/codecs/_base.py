"""The one interface every codec family implements, and the registry that picks one for a spec."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from ._spec import CodecSpec

__all__ = ["Codec", "CodecError", "SUPPORTED_DTYPES", "TunableCodec"]

SUPPORTED_DTYPES = (np.dtype("uint8"), np.dtype("uint16"), np.dtype("int16"), np.dtype("float32"))


class CodecError(ValueError):
    """A chip cannot be encoded or decoded as asked; the message says why and what to do."""


@runtime_checkable
class Codec(Protocol):
    """A codec family: turns a (time, band, y, x) chip into payload sections and back.

    Implementations get chips already validated, reshaped to 4-D and (for coded paths) mapped to
    unsigned integer codes; the payload header and checksum are handled by `encode_chip`.
    """

    name: str
    coded: bool
    """True if the codec takes unsigned integer codes (image/video), False if it takes chip values."""

    def encode(self, chip: np.ndarray, spec: CodecSpec, knob: float | None) -> tuple[dict, dict[str, bytes]]:
        """Encode ``chip`` with quality ``knob`` (codec-native); return header params and sections."""
        ...

    def decode(self, params: dict, sections: dict[str, memoryview], shape: tuple[int, ...]) -> np.ndarray:
        """Decode sections back to the array that `encode` received."""
        ...


@runtime_checkable
class TunableCodec(Codec, Protocol):
    """A lossy codec with one quality knob that rate control can search."""

    def knob_space(self, span: float) -> tuple[float, float, bool, bool]:
        """(best-quality knob, lowest-rate knob, log scale, integer) for data spanning ``span``."""
        ...

    def default_knob(self) -> float:
        """Knob used when the spec sets no quality or target."""
        ...
