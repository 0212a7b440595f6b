"""Clay v1 / v1.5: a ViT whose patch embedding is generated from the bands' wavelengths, so any band set fits.

Parameter names and shapes follow the ``Encoder`` of Clay-foundation/model (``src/model.py`` for
v1, ``claymodel/model.py`` for v1.5): ``cls_token``; ``patch_embedding`` = the DOFA-style dynamic
embedding (``fclayer.l1``/``l2``; ``weight_generator`` with a one-layer ``encoder``,
``fc_weight``, ``fc_bias``, ``weight_tokens``, ``bias_token``); ``transformer`` = vit-pytorch's
simple ViT (``layers.N.0`` attention with ``norm``/``to_qkv``/``to_out``, ``layers.N.1.net``
feed-forward, final ``norm``). Lightning checkpoints keep the encoder under ``model.encoder.``
(the default ``checkpoint_prefix``); decoder, teacher and projection weights lie outside it and
are ignored. v1 is ``base`` (768 wide, 12 deep), v1.5 is ``large`` (1024, 24); both use 8-pixel
patches. Wavelengths are in micrometres, as in Clay's ``configs/metadata.yaml``. Positions add a
ground-sample-distance-scaled 2-D sine-cosine table, and the last 8 channels carry week-of-year,
hour and lat/lon as sines and cosines, taken from each chip (hour: 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from eoprep.embed._base import EncoderInfo, load_checkpoint

__all__ = ["ClayEncoder", "build_clay"]

#: Central wavelengths (µm) and Clay's Sentinel-2 L2A normalisation (its DN statistics / 10000) by common name.
WAVELENGTHS = {
    "blue": 0.493,
    "green": 0.56,
    "red": 0.665,
    "rededge1": 0.704,
    "rededge2": 0.74,
    "rededge3": 0.783,
    "nir": 0.842,
    "nir08": 0.865,
    "swir16": 1.61,
    "swir22": 2.19,
}
S2_MEAN = {
    "blue": 0.1105,
    "green": 0.1355,
    "red": 0.1552,
    "rededge1": 0.1887,
    "rededge2": 0.2422,
    "rededge3": 0.2630,
    "nir": 0.2743,
    "nir08": 0.2785,
    "swir16": 0.2388,
    "swir22": 0.1835,
}
S2_STD = {
    "blue": 0.1809,
    "green": 0.1757,
    "red": 0.1888,
    "rededge1": 0.1870,
    "rededge2": 0.1732,
    "rededge3": 0.1697,
    "nir": 0.1742,
    "nir08": 0.1648,
    "swir16": 0.1470,
    "swir22": 0.1379,
}
SIZES = {"base": (768, 12, 12), "large": (1024, 24, 16)}


def _sincos_1d(values: torch.Tensor, dim: int) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, device=values.device) / (dim // 2 - 1))
    scaled = values.reshape(-1, 1) * omega
    return torch.cat([scaled.sin(), scaled.cos()], dim=1)


def _sincos_2d(side: int, dim: int, gsd: float) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    omega = torch.arange(dim // 4) / (dim // 4 - 1)
    omega = 1.0 / 10000 ** (2 * omega / dim) * gsd
    y, x = y.flatten()[:, None] * omega, x.flatten()[:, None] * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


class FCBlock(nn.Module):
    """Residual two-layer GELU MLP applied to the wavelength encodings."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.l1 = nn.Linear(size, size)
        self.l2 = nn.Linear(size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(self.l2(F.gelu(self.l1(x))))


class WavesTransformer(nn.Module):
    """Turns one token per band into that band's patch-projection weights, plus one shared bias."""

    def __init__(self, wave_dim: int, out_dim: int, embed_dim: int, tokens: int = 128) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            wave_dim, nhead=4, activation="gelu", dropout=0.0, norm_first=False, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.fc_weight = nn.Linear(wave_dim, out_dim)
        self.fc_bias = nn.Linear(wave_dim, embed_dim)
        self.weight_tokens = nn.Parameter(torch.randn(tokens, wave_dim) * 0.02)
        self.bias_token = nn.Parameter(torch.randn(1, wave_dim) * 0.02)

    def forward(self, waves: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.weight_tokens)
        tokens = torch.cat([self.weight_tokens, waves, self.bias_token])
        out = self.encoder(tokens)
        return self.fc_weight(out[n:-1] + waves), self.fc_bias(out[-1])


class DynamicEmbedding(nn.Module):
    def __init__(self, *, wave_dim: int, patch: int, dim: int) -> None:
        super().__init__()
        self.wave_dim, self.patch, self.dim = wave_dim, patch, dim
        self.weight_generator = WavesTransformer(wave_dim, dim * patch * patch, dim)
        self.fclayer = FCBlock(wave_dim)

    def forward(self, x: torch.Tensor, waves: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight_generator(self.fclayer(_sincos_1d(waves, self.wave_dim)))
        # one generated row per input band, laid out (out channel, ky, kx); scaled by 0.02, bias as is
        kernel = weight.view(x.shape[1], self.dim, self.patch, self.patch).transpose(0, 1) * 0.02
        out = F.conv2d(x, kernel.to(x.dtype), bias=bias.to(x.dtype), stride=self.patch)
        return out.flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, heads * dim_head * 3, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.to_qkv(self.norm(x)).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Transformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim, heads, dim_head), FeedForward(dim, mlp_dim)]) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = x + attn(x)
            x = x + ff(x)
        return self.norm(x)


class ClayEncoder(nn.Module):
    """Input ``(B, C, H, W)`` plus per-chip ``meta`` (lat, lon, day of year); the embedding is the class token."""

    def __init__(self, *, waves: Sequence[float], gsd: float, patch: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.dim, self.gsd = dim, gsd
        self.patch_embedding = DynamicEmbedding(wave_dim=128, patch=patch, dim=dim)
        self.transformer = Transformer(dim, depth, heads, 64, dim * 4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.register_buffer("waves", torch.tensor(list(waves), dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        patches = self.patch_embedding(x, self.waves)
        b, n, _ = patches.shape
        pos = _sincos_2d(math.isqrt(n), self.dim - 8, self.gsd).to(patches)
        if meta is None:
            meta = torch.zeros(b, 3, device=x.device)
        lat, lon = torch.deg2rad(meta[:, 0:1]), torch.deg2rad(meta[:, 1:2])
        week = meta[:, 2:3] / 7.0 * 2 * math.pi / 52
        extra = torch.cat(
            [
                week.sin(),
                week.cos(),
                torch.zeros_like(week),
                torch.ones_like(week),
                lat.sin(),
                lat.cos(),
                lon.sin(),
                lon.cos(),
            ],
            dim=1,
        ).to(patches)
        patches = patches + torch.cat([pos.expand(b, -1, -1), extra.unsqueeze(1).expand(-1, n, -1)], dim=2)
        tokens = self.transformer(torch.cat([self.cls_token.expand(b, -1, -1).to(patches), patches], dim=1))
        return tokens[:, 0]


def build_clay(params: dict[str, Any], input_bands: Sequence[str], checkpoint: str | None) -> ClayEncoder:
    """The ``clay`` encoder: ``variant`` base/large (or ``dim``/``depth``/``heads``), ``bands``, ``gsd``, ``size``."""
    variant = params.get("variant", "base")
    if variant not in SIZES:
        raise ValueError(f"encoder.params.variant: {variant!r} is not one of {sorted(SIZES)}")
    dim, depth, heads = (params.get(k, v) for k, v in zip(("dim", "depth", "heads"), SIZES[variant], strict=True))
    bands = tuple(params.get("bands", ("blue", "green", "red", "nir", "swir16", "swir22")))
    unknown = [b for b in bands if b not in WAVELENGTHS]
    if unknown:
        raise ValueError(f"encoder.params.bands: {unknown} have no known wavelength; use {sorted(WAVELENGTHS)}")
    patch, size, gsd = int(params.get("patch", 8)), int(params.get("size", 256)), float(params.get("gsd", 10.0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(params.get("seed", 0)))
        model = ClayEncoder(
            waves=[WAVELENGTHS[b] for b in bands], gsd=gsd, patch=patch, dim=dim, depth=depth, heads=heads
        )
    weights = "random-init"
    if checkpoint is not None:
        weights = load_checkpoint(model, checkpoint, prefix=params.get("checkpoint_prefix", "model.encoder."))
    model.info = EncoderInfo(
        name="clay",
        version=f"v1-{variant}-{dim}x{depth}-p{patch}-{size}",
        bands=bands,
        mean=tuple(S2_MEAN[b] for b in bands),
        std=tuple(S2_STD[b] for b in bands),
        dim=dim,
        resolution=gsd,
        size=size,
        weights=weights,
        extra={"uses_meta": True},
    )
    return model
