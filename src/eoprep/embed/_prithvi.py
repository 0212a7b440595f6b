"""Prithvi-EO-2.0 (NASA/IBM): a ViT over (band, time, y, x) tubelets with fixed 3-D sine-cosine positions.

Parameter names and shapes follow ``PrithviViT`` of the Prithvi-EO-2.0 release (``prithvi_mae.py``,
also ``terratorch.models.backbones.prithvi_mae``): ``patch_embed.proj`` as a Conv3d,
``cls_token``, timm ``blocks.N``, ``norm``. The released checkpoints are ``PrithviMAE`` state
dicts with the encoder under ``encoder.`` (the default ``checkpoint_prefix``), so the decoder
(``decoder.*``) is ignored. Positions are recomputed for the input grid, so the checkpoint's
``pos_embed`` buffer is not needed; the time/location scales of the ``-TL`` checkpoints
(``temporal_embed_enc.scale``, ``location_embed_enc.scale``) are skipped as well, which is how
``PrithviViT`` runs when no coordinates are given. 300M uses 16-pixel patches, 600M 14-pixel ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from eoprep.embed._base import EncoderInfo, load_checkpoint
from eoprep.embed._vit import Block

__all__ = ["PrithviEncoder", "build_prithvi"]

#: HLS bands Prithvi-EO-2.0 was trained on, as common names, and their mean/std (reflectance).
PRITHVI_BANDS = ("blue", "green", "red", "nir08", "swir16", "swir22")
PRITHVI_MEAN = (0.1087, 0.1342, 0.1433, 0.2734, 0.1958, 0.1363)
PRITHVI_STD = (0.2248, 0.2179, 0.2178, 0.1850, 0.1242, 0.1049)
#: (embedding dim, depth, heads, patch) of the released sizes.
VARIANTS = {"300m": (1024, 24, 16, 16), "600m": (1280, 32, 16, 14)}
#: Checkpoint entries the encoder does not use (fixed positions, the -TL coordinate scales).
UNUSED = ("pos_embed", "temporal_embed_enc.scale", "location_embed_enc.scale")


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.reshape(-1, 1).double() * omega
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_3d(dim: int, frames: int, rows: int, cols: int) -> torch.Tensor:
    """Fixed position table as in Prithvi: channels for x (6/16), then y (6/16), then time (4/16).

    Tokens run time-major, then row, then column (the Conv3d output flattened); a zero row for
    the class token comes first.
    """
    w_xy, w_t = dim // 16 * 6, dim // 16 * 4
    t, h, w = torch.meshgrid(torch.arange(frames), torch.arange(rows), torch.arange(cols), indexing="ij")
    table = torch.cat([_sincos_1d(w_xy, w), _sincos_1d(w_xy, h), _sincos_1d(w_t, t)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float().unsqueeze(0)


class PatchEmbed3d(nn.Module):
    def __init__(self, channels: int, dim: int, patch: int, tubelet: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(channels, dim, kernel_size=(tubelet, patch, patch), stride=(tubelet, patch, patch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class PrithviEncoder(nn.Module):
    """Input ``(B, C, T, H, W)``; the embedding is the mean of the patch tokens after the last norm."""

    def __init__(self, *, channels: int, patch: int, tubelet: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.patch, self.tubelet, self.dim = patch, tubelet, dim
        self.patch_embed = PatchEmbed3d(channels, dim, patch, tubelet)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self._pos: dict[tuple[int, int, int], torch.Tensor] = {}

    def forward(self, x: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() == 4:
            x = x.unsqueeze(2)
        grid = (x.shape[2] // self.tubelet, x.shape[3] // self.patch, x.shape[4] // self.patch)
        if grid not in self._pos:
            self._pos[grid] = sincos_3d(self.dim, *grid)
        pos = self._pos[grid].to(device=x.device, dtype=x.dtype)
        tokens = self.patch_embed(x) + pos[:, 1:]
        cls = (self.cls_token + pos[:, :1]).expand(len(tokens), -1, -1)
        tokens = self.norm(self.blocks(torch.cat([cls, tokens], dim=1)))
        return tokens[:, 1:].mean(dim=1)


def build_prithvi(params: dict[str, Any], input_bands: Sequence[str], checkpoint: str | None) -> PrithviEncoder:
    """The ``prithvi-eo-2`` encoder: ``variant`` 300m/600m (or ``dim``/``depth``/``heads``/``patch``), ``frames``,
    ``size``."""
    variant = params.get("variant", "300m")
    if variant not in VARIANTS:
        raise ValueError(f"encoder.params.variant: {variant!r} is not one of {sorted(VARIANTS)}")
    keys = ("dim", "depth", "heads", "patch")
    dim, depth, heads, patch = (int(params.get(k, v)) for k, v in zip(keys, VARIANTS[variant], strict=True))
    tubelet = int(params.get("tubelet", 1))
    frames, size = int(params.get("frames", 4)), int(params.get("size", 224))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(params.get("seed", 0)))
        model = PrithviEncoder(
            channels=len(PRITHVI_BANDS), patch=patch, tubelet=tubelet, dim=dim, depth=depth, heads=heads
        )
    weights = "random-init"
    if checkpoint is not None:
        weights = load_checkpoint(model, checkpoint, prefix=params.get("checkpoint_prefix", "encoder."), ignore=UNUSED)
    model.info = EncoderInfo(
        name="prithvi-eo-2",
        version=f"{variant}-{dim}x{depth}-p{patch}-t{tubelet}-{frames}x{size}",
        bands=PRITHVI_BANDS,
        mean=PRITHVI_MEAN,
        std=PRITHVI_STD,
        dim=dim,
        resolution=30.0,
        size=size,
        frames=frames,
        weights=weights,
    )
    return model
