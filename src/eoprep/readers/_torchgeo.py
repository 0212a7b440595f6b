"""A TorchGeo view of the chips, for users whose training code expects a ``NonGeoDataset``."""

from __future__ import annotations

from typing import Any

import torch

from eoprep.readers._datasets import ChipDataset

__all__ = ["as_torchgeo"]


def as_torchgeo(dataset: ChipDataset) -> Any:
    """Wrap a `ChipDataset` as a ``torchgeo.datasets.NonGeoDataset``.

    Samples follow TorchGeo's convention: ``image`` is a float32 tensor ``(channels, y, x)`` with
    every group's ``time × band`` planes stacked in group order; the eoprep fields (``id``,
    ``pixels``, ``datetime``, ...) stay alongside for code that wants them.

    Raises
    ------
    ImportError
        When torchgeo is not installed (``pip install 'eoprep[torchgeo]'``).
    """
    try:
        from torchgeo.datasets import NonGeoDataset
    except ImportError as exc:
        raise ImportError("as_torchgeo needs torchgeo: pip install 'eoprep[torchgeo]'") from exc

    class ChipNonGeoDataset(NonGeoDataset):  # type: ignore[misc, valid-type]
        """The chips of an eoprep output as a TorchGeo ``NonGeoDataset``."""

        def __init__(self, chips: ChipDataset) -> None:
            self.chips = chips

        def __len__(self) -> int:
            return len(self.chips)

        def __getitem__(self, index: int) -> dict[str, Any]:
            sample = self.chips[index]
            planes = [p.reshape(-1, *p.shape[-2:]).to(torch.float32) for p in sample["pixels"].values()]
            return {**sample, "image": torch.cat(planes)}

    return ChipNonGeoDataset(dataset)
