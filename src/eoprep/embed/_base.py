"""What every encoder declares and how chips are turned into the tensor it expects.

An encoder is a ``torch.nn.Module`` with an ``info`` attribute: the bands it needs (by common
name), their normalisation, the resolution and input size it was trained on, how many time steps
it reads and its output dimension. Everything between the Zarr chip and that input (scale/offset,
cloud mask, temporal composite, band order, normalisation, resize) runs in `ChipDecoder`, on the
same device as the model, so the host only decompresses and copies raw integers.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from eoprep.embed._spec import is_remote
from eoprep.errors import EoprepError

__all__ = ["BAND_ALIASES", "ChipDecoder", "Encoder", "EncoderInfo", "load_checkpoint", "map_bands"]

#: STAC asset keys that can feed a model band given by its common name, best first. ``nir08`` (narrow
#: NIR, Sentinel-2 B8A / HLS) falls back to broad NIR (B08) when a collection has no narrow band.
BAND_ALIASES: dict[str, tuple[str, ...]] = {
    "coastal": ("B01", "coastal"),
    "blue": ("B02", "blue"),
    "green": ("B03", "green"),
    "red": ("B04", "red"),
    "rededge1": ("B05", "rededge1", "rededge"),
    "rededge2": ("B06", "rededge2"),
    "rededge3": ("B07", "rededge3"),
    "nir": ("B08", "nir"),
    "nir08": ("B8A", "nir08", "B08", "nir"),
    "nir09": ("B09", "nir09"),
    "cirrus": ("B10", "cirrus"),
    "swir16": ("B11", "swir16"),
    "swir22": ("B12", "swir22"),
    "vv": ("vv", "VV"),
    "vh": ("vh", "VH"),
}


@dataclass(frozen=True)
class EncoderInfo:
    """What an encoder needs and produces; recorded in the feature store's metadata.

    ``mean``/``std`` are in physical units (reflectance after scale/offset), one per band.
    ``size`` is the side length chips are resized to (None: native), ``frames`` how many time
    steps the model reads (1: a composite of the window).
    """

    name: str
    version: str
    bands: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dim: int
    resolution: float | None = None
    size: int | None = None
    frames: int = 1
    weights: str = "random-init"
    extra: dict[str, object] = field(default_factory=dict)


@runtime_checkable
class Encoder(Protocol):
    """A module mapping normalised chips ``(B, C, H, W)`` (or ``(B, C, T, H, W)``) to ``(B, dim)``."""

    info: EncoderInfo

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def map_bands(model_bands: Sequence[str], available: Sequence[str], overrides: dict[str, str]) -> list[str]:
    """The asset key feeding each model band: the spec's ``band_map``, the name itself, then `BAND_ALIASES`.

    Parameters
    ----------
    model_bands : sequence of str
        Band names the encoder declares, in its input order.
    available : sequence of str
        Band (asset) keys of the input group.
    overrides : dict
        ``encoder.band_map`` of the spec: model band → asset key.

    Returns
    -------
    list of str
        One asset key per model band.

    Raises
    ------
    EoprepError
        If a model band has no source among ``available``.
    """
    chosen = []
    for band in model_bands:
        candidates = (overrides[band],) if band in overrides else (band, *BAND_ALIASES.get(band, ()))
        key = next((c for c in candidates if c in available), None)
        if key is None:
            raise EoprepError(
                f"encoder band {band!r} has no source among the input bands {list(available)} "
                f"(tried {list(candidates)}); map it with encoder.band_map: {{{band}: ASSET_KEY}}"
            )
        chosen.append(key)
    return chosen


def fetch_checkpoint(location: str) -> Path:
    """The local file of a checkpoint: URLs are downloaded once into the eoprep cache and reused.

    Workers of one machine share the cache; the download goes through a temporary name and a rename,
    so a worker never loads a half-written file.
    """
    if not is_remote(location):
        return Path(location.removeprefix("file://"))
    cache = Path(os.environ.get("EOPREP_CACHE") or Path.home() / ".cache" / "eoprep") / "checkpoints"
    name = hashlib.sha256(location.encode()).hexdigest()[:16] + "-" + Path(location.split("?")[0]).name
    target = cache / name
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.partial")
    try:
        if location.startswith(("http://", "https://")):
            with urllib.request.urlopen(location, timeout=60) as answer, tmp.open("wb") as out:
                shutil.copyfileobj(answer, out)
        else:
            import fsspec

            with fsspec.open(location, "rb") as answer, tmp.open("wb") as out:
                shutil.copyfileobj(answer, out)
        os.replace(tmp, target)
    except (OSError, ValueError) as exc:
        raise EoprepError(f"encoder.checkpoint: cannot fetch {location}: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def load_checkpoint(
    module: nn.Module,
    path: str,
    *,
    prefix: str = "",
    ignore: Sequence[str] = (),
    adapt: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> str:
    """Load a local state dict into ``module`` (strictly) and return a short content hash for provenance.

    Accepts a bare state dict or one nested under ``state_dict``/``model``; keys starting with
    ``prefix`` keep only the rest (e.g. ``encoder.`` for Prithvi's MAE checkpoints), other keys
    are ignored, and so are the names in ``ignore`` (tables the module recomputes, heads it does
    not use). ``adapt`` may then rewrite the entries (e.g. select input channels). Mismatched
    names or shapes are reported, never silently skipped.
    """
    file = fetch_checkpoint(path)
    digest = hashlib.sha256(file.read_bytes()).hexdigest()[:12]
    payload = torch.load(file, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
    if prefix:
        payload = {k[len(prefix) :]: v for k, v in payload.items() if k.startswith(prefix)}
    payload = {k: v for k, v in payload.items() if k not in ignore}
    if adapt is not None:
        payload = adapt(payload)
    own = module.state_dict()
    missing = sorted(set(own) - set(payload))
    unexpected = sorted(set(payload) - set(own))
    shapes = [k for k in own if k in payload and tuple(payload[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise EoprepError(
            f"encoder.checkpoint: {file} does not fit the {type(module).__name__} built from encoder.params: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {shapes[:5]} "
            f"({len(missing)}/{len(unexpected)}/{len(shapes)} in all). Check the params (size, dim, depth, "
            "bands) and encoder.params.checkpoint_prefix."
        )
    module.load_state_dict(payload, strict=True)
    return f"sha256:{digest}"


class ChipDecoder(nn.Module):
    """Raw chip integers → normalised model input, on the model's device.

    Input: ``(B, T, C_all, H, W)`` raw values viewed as signed integers of the stored width (or
    floats). Steps: keep the encoder's bands in its order, apply scale/offset, drop nodata and
    masked (cloud) pixels, composite the time axis (mean or median of the clear scenes; where none
    is clear, of the valid ones), standardise, zero what has no data, resize to the model size.
    """

    def __init__(
        self,
        *,
        band_index: Sequence[int],
        scale: Sequence[float],
        offset: Sequence[float],
        nodata: float,
        mean: Sequence[float],
        std: Sequence[float],
        mask_index: int | None = None,
        mask_invalid: Sequence[int] = (),
        reduce: str = "mean",
        frames: int = 1,
        size: int | None = None,
        unsigned_bits: int = 16,
    ) -> None:
        super().__init__()
        self.register_buffer("band_index", torch.as_tensor(list(band_index), dtype=torch.long), persistent=False)
        self.register_buffer(
            "scale", torch.as_tensor(scale, dtype=torch.float32).view(1, 1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "offset", torch.as_tensor(offset, dtype=torch.float32).view(1, 1, -1, 1, 1), persistent=False
        )
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("mask_invalid", torch.as_tensor(list(mask_invalid), dtype=torch.long), persistent=False)
        self.nodata = float(nodata)
        self.mask_index = mask_index
        self.reduce = reduce
        self.frames = frames
        self.size = size
        self.wrap = float(1 << unsigned_bits)

    def _physical(self, raw: torch.Tensor) -> torch.Tensor:
        if raw.dtype.is_floating_point:
            return raw.float()
        values = raw.to(torch.int32).float()
        return torch.where(values < 0, values + self.wrap, values)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        all_bands = self._physical(raw)
        dn = all_bands.index_select(2, self.band_index)
        if self.nodata != self.nodata:
            valid = ~torch.isnan(dn).any(dim=2)
        else:
            valid = (dn != self.nodata).all(dim=2)
        clear = valid
        if self.mask_index is not None:
            classes = all_bands[:, :, self.mask_index].round().long()
            clear = valid & ~torch.isin(classes, self.mask_invalid)
        use = torch.where(clear.any(dim=1, keepdim=True), clear, valid)
        refl = torch.nan_to_num(dn * self.scale + self.offset)
        composite, has_data = self._reduce(refl, use)
        if self.frames > 1:
            x = self._frames(refl, use, composite, has_data)
        else:
            x = (composite - self.mean) / self.std * has_data.unsqueeze(1)
        if self.size is not None and x.shape[-1] != self.size:
            lead = x.shape[:-2]
            x = F.interpolate(x.reshape(-1, 1, *x.shape[-2:]), size=(self.size, self.size), mode="bilinear")
            x = x.reshape(*lead, self.size, self.size)
        return x

    def _reduce(self, refl: torch.Tensor, use: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight = use.unsqueeze(2).float()
        count = weight.sum(dim=1)
        has_data = count[:, 0] > 0
        if self.reduce == "median":
            masked = torch.where(use.unsqueeze(2), refl, torch.full_like(refl, float("nan")))
            composite = torch.nan_to_num(masked.nanmedian(dim=1).values)
        else:
            composite = (refl * weight).sum(dim=1) / count.clamp(min=1)
        return composite, has_data

    def _frames(
        self, refl: torch.Tensor, use: torch.Tensor, composite: torch.Tensor, has_data: torch.Tensor
    ) -> torch.Tensor:
        """The ``frames`` clearest scenes in time order, holes filled from the composite: ``(B, C, F, H, W)``."""
        b, t = use.shape[:2]
        score = use.flatten(2).float().mean(dim=2) + torch.linspace(0, 1e-3, t, device=use.device)
        picks = score.topk(min(self.frames, t), dim=1).indices.sort(dim=1).values
        if picks.shape[1] < self.frames:
            picks = torch.cat([picks, picks[:, -1:].expand(b, self.frames - picks.shape[1])], dim=1)
        rows = torch.arange(b, device=use.device).unsqueeze(1)
        chosen = torch.where(use[rows, picks].unsqueeze(2), refl[rows, picks], composite.unsqueeze(1))
        x = (chosen - self.mean.unsqueeze(1)) / self.std.unsqueeze(1) * has_data[:, None, None]
        return x.transpose(1, 2)
