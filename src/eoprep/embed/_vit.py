"""A plain Vision Transformer whose parameter names match timm's ``VisionTransformer``.

Names and shapes are those of timm's class-token ViT (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``), so
timm and torchgeo checkpoints (e.g. torchgeo's SSL4EO-S12 Sentinel-2 ViT-S/16 weights: timm
``vit_small_patch16_224`` with ``in_chans=13`` and no head) load into it without either package.
A classifier ``head`` in the checkpoint is ignored. A checkpoint with more input channels than the
chips offer loads when ``checkpoint_bands`` names its channels: the patch projection keeps the
columns of ``bands`` (the dropped bands then count as zero, i.e. their mean). The blocks are
reused by the Prithvi adapter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from eoprep.embed._base import EncoderInfo, load_checkpoint

__all__ = ["PRESETS", "Block", "VitEncoder", "build_vit"]

#: (embedding dim, depth, heads) of the usual sizes.
PRESETS = {"vit-t": (192, 12, 3), "vit-s": (384, 12, 6), "vit-b": (768, 12, 12), "vit-l": (1024, 24, 16)}


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (timm names: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, channels: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VitEncoder(nn.Module):
    """ViT with a class token and learned position embedding; the embedding is the class token or the token mean."""

    def __init__(
        self, *, channels: int, size: int, patch: int, dim: int, depth: int, heads: int, pool: str = "cls"
    ) -> None:
        super().__init__()
        self.pool = pool
        self.patch_embed = PatchEmbed(channels, dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (size // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        tokens = self.norm(self.blocks(tokens + _resize_pos(self.pos_embed, tokens.shape[1])))
        return tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(dim=1)


def _resize_pos(pos: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Bicubic resize of a learned position grid to another number of patches (as timm does)."""
    if pos.shape[1] == n_tokens:
        return pos
    old, new = math.isqrt(pos.shape[1] - 1), math.isqrt(n_tokens - 1)
    grid = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)], dim=1)


def _channel_picker(
    bands: Sequence[str], checkpoint_bands: Sequence[str] | None
) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None:
    """Keep the patch-projection input channels of ``bands`` from a checkpoint with ``checkpoint_bands``."""
    if checkpoint_bands is None:
        return None
    unknown = [b for b in bands if b not in checkpoint_bands]
    if unknown:
        raise ValueError(f"encoder.params.bands: {unknown} are not among checkpoint_bands {list(checkpoint_bands)}")
    index = [list(checkpoint_bands).index(b) for b in bands]

    def pick(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weight = state.get("patch_embed.proj.weight")
        if weight is not None and weight.shape[1] == len(checkpoint_bands):
            state = {**state, "patch_embed.proj.weight": weight[:, index].contiguous()}
        return state

    return pick


def build_vit(params: dict[str, Any], input_bands: Sequence[str], checkpoint: str | None) -> VitEncoder:
    """The ``vit`` encoder: ``arch`` (vit-t/s/b/l) or explicit ``dim``/``depth``/``heads``, ``size``, ``patch``.

    ``bands`` (default: the input bands) lists the channels in checkpoint order, or a subset of
    ``checkpoint_bands`` (all the checkpoint's channels, in order); ``mean``/``std`` default to
    0.15/0.10 reflectance per band, ``pool`` is ``cls`` or ``mean``.
    """
    arch = params.get("arch", "vit-b")
    if arch not in PRESETS:
        raise ValueError(f"encoder.params.arch: {arch!r} is not one of {sorted(PRESETS)}")
    dim, depth, heads = (params.get(k, v) for k, v in zip(("dim", "depth", "heads"), PRESETS[arch], strict=True))
    bands = tuple(params.get("bands", input_bands))
    size, patch = int(params.get("size", 224)), int(params.get("patch", 16))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(params.get("seed", 0)))
        model = VitEncoder(
            channels=len(bands),
            size=size,
            patch=patch,
            dim=dim,
            depth=depth,
            heads=heads,
            pool=params.get("pool", "cls"),
        )
    weights = "random-init"
    if checkpoint is not None:
        weights = load_checkpoint(
            model,
            checkpoint,
            prefix=params.get("checkpoint_prefix", ""),
            ignore=("head.weight", "head.bias"),
            adapt=_channel_picker(bands, params.get("checkpoint_bands")),
        )
    model.info = EncoderInfo(
        name="vit",
        version=f"{arch}-{dim}x{depth}-p{patch}-{size}",
        bands=bands,
        mean=tuple(params.get("mean", [0.15] * len(bands))),
        std=tuple(params.get("std", [0.10] * len(bands))),
        dim=dim,
        resolution=params.get("resolution"),
        size=size,
        weights=weights,
    )
    return model
