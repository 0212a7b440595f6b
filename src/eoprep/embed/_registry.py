"""Encoder names of the spec and the function that builds each one."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from eoprep.embed._clay import build_clay
from eoprep.embed._mosaiks import build_mosaiks
from eoprep.embed._prithvi import build_prithvi
from eoprep.embed._vit import build_vit
from eoprep.errors import EoprepError

__all__ = ["ENCODERS", "build_encoder"]

Builder = Callable[[dict[str, Any], Sequence[str], str | None], nn.Module]

ENCODERS: dict[str, Builder] = {
    "mosaiks": build_mosaiks,
    "vit": build_vit,
    "prithvi-eo-2": build_prithvi,
    "clay": build_clay,
}


def build_encoder(
    name: str, params: dict[str, Any], input_bands: Sequence[str], checkpoint: str | None = None
) -> nn.Module:
    """Build a registered encoder in eval mode; ``input_bands`` are the asset keys the chips offer.

    Parameters
    ----------
    name : str
        One of `ENCODERS`.
    params : dict
        ``encoder.params`` of the spec.
    input_bands : sequence of str
        Band keys of the input group (the default band list of band-agnostic encoders).
    checkpoint : str, optional
        Local path of a state dict.

    Returns
    -------
    torch.nn.Module
        The encoder, with its `EncoderInfo` as ``.info``.
    """
    try:
        model = ENCODERS[name](dict(params), list(input_bands), checkpoint)
    except (ValueError, TypeError) as exc:
        raise EoprepError(f"encoder {name!r}: {exc}") from None
    return model.eval()
