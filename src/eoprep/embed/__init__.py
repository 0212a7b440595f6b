"""Embedding stage: encode chip shards into feature stores (GeoParquet + Zarr + STAC) and search them.

`embed` is the entry point; encoders are plug-ins behind `Encoder` (a module with `EncoderInfo`),
one module each: MOSAIKS-style random features (default, no weights), a timm-compatible ViT,
Prithvi-EO-2.0 and Clay v1.
"""

from __future__ import annotations

from eoprep.embed._base import BAND_ALIASES, ChipDecoder, Encoder, EncoderInfo, load_checkpoint, map_bands
from eoprep.embed._registry import ENCODERS, build_encoder
from eoprep.embed._run import EmbedSummary, EncodeTask, auto_batch_size, embed, encode_chips
from eoprep.embed._search import read_vector, search
from eoprep.embed._spec import EmbedSpec, load_embed_spec, parse_embed_spec
from eoprep.embed._store import FeatureStore

__all__ = [
    "BAND_ALIASES",
    "ENCODERS",
    "ChipDecoder",
    "EmbedSpec",
    "EmbedSummary",
    "EncodeTask",
    "Encoder",
    "EncoderInfo",
    "FeatureStore",
    "auto_batch_size",
    "build_encoder",
    "embed",
    "encode_chips",
    "load_checkpoint",
    "load_embed_spec",
    "map_bands",
    "parse_embed_spec",
    "read_vector",
    "search",
]
