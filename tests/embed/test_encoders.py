"""Encoders with random weights: shapes, band mapping, determinism, checkpoints, and the on-device decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eoprep.embed import ENCODERS, ChipDecoder, Encoder, build_encoder, map_bands
from eoprep.errors import EoprepError

S2 = ["B02", "B03", "B04", "B08", "B11", "B12"]
TINY = {"dim": 32, "depth": 2, "heads": 4, "size": 32}
CASES = {
    "mosaiks": {"features": 16},
    "vit": {"arch": "vit-s", **TINY, "patch": 8},
    "prithvi-eo-2": {**TINY, "patch": 8, "frames": 2},
    "clay": {**TINY, "patch": 8},
}


def _input(model: torch.nn.Module, n: int = 3, seed: int = 0) -> torch.Tensor:
    info = model.info
    frames = (info.frames,) if info.frames > 1 else ()
    side = info.size or 24
    return torch.randn(n, len(info.bands), *frames, side, side, generator=torch.Generator().manual_seed(seed))


def test_every_registered_encoder_is_covered():
    assert set(CASES) == set(ENCODERS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_shape_determinism_and_batch_independence(name):
    a = build_encoder(name, CASES[name], S2)
    b = build_encoder(name, CASES[name], S2)
    assert isinstance(a, Encoder)
    x = _input(a)
    meta = torch.tensor([[45.4, 9.0, 150.0]] * 3)
    with torch.inference_mode():
        ya, yb = a(x, meta), b(x, meta)
        one = a(x[1:2], meta[1:2])
    assert ya.shape == (3, a.info.dim)
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(one[0], ya[1], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ya[0], ya[1])


@pytest.mark.parametrize("name", ["vit", "prithvi-eo-2", "clay"])
def test_seed_changes_random_init_and_checkpoint_restores_it(name, tmp_path):
    params = CASES[name]
    model = build_encoder(name, {**params, "seed": 1}, S2)
    other = build_encoder(name, {**params, "seed": 2}, S2)
    x = _input(model)
    with torch.inference_mode():
        assert not torch.allclose(model(x), other(x))
    prefix = {"prithvi-eo-2": "encoder.", "clay": "model.encoder."}.get(name, "")
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {f"{prefix}{k}": v for k, v in model.state_dict().items()}}, path)
    loaded = build_encoder(name, {**params, "seed": 2}, S2, checkpoint=str(path))
    assert loaded.info.weights.startswith("sha256:")
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x))


def test_a_checkpoint_url_is_fetched_once_into_the_cache(tmp_path, monkeypatch):
    """A checkpoint served over HTTP (a real local server) loads like the same file given as a path."""
    import functools
    import http.server
    import threading

    model = build_encoder("vit", {**CASES["vit"], "seed": 1}, S2)
    (tmp_path / "served").mkdir()
    torch.save(model.state_dict(), tmp_path / "served" / "vit.pt")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "served"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("EOPREP_CACHE", str(tmp_path / "cache"))
    url = f"http://127.0.0.1:{server.server_address[1]}/vit.pt"
    try:
        loaded = build_encoder("vit", {**CASES["vit"], "seed": 2}, S2, checkpoint=url)
    finally:
        server.shutdown()
    cached = list((tmp_path / "cache" / "checkpoints").iterdir())
    assert len(cached) == 1 and cached[0].name.endswith("-vit.pt")
    again = build_encoder("vit", {**CASES["vit"], "seed": 2}, S2, checkpoint=url)
    x = _input(model)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x))
        torch.testing.assert_close(again(x), model(x))
    with pytest.raises(EoprepError, match=r"encoder.checkpoint: cannot fetch http://127.0.0.1:9/x.pt"):
        build_encoder("vit", CASES["vit"], S2, checkpoint="http://127.0.0.1:9/x.pt")


def test_a_checkpoint_of_another_size_is_refused_with_the_keys(tmp_path):
    small = build_encoder("vit", {**CASES["vit"], "dim": 16, "heads": 2}, S2)
    torch.save(small.state_dict(), tmp_path / "small.pt")
    with pytest.raises(EoprepError, match=r"shape mismatch \['cls_token'"):
        build_encoder("vit", CASES["vit"], S2, checkpoint=str(tmp_path / "small.pt"))


def test_prithvi_and_clay_map_common_names_to_sentinel2_assets():
    prithvi = build_encoder("prithvi-eo-2", CASES["prithvi-eo-2"], S2)
    assert map_bands(prithvi.info.bands, S2, {}) == ["B02", "B03", "B04", "B08", "B11", "B12"]
    assert map_bands(prithvi.info.bands, [*S2, "B8A"], {}) == ["B02", "B03", "B04", "B8A", "B11", "B12"]
    clay = build_encoder("clay", {**CASES["clay"], "bands": ["red", "nir"]}, S2)
    assert map_bands(clay.info.bands, S2, {"nir": "B08"}) == ["B04", "B08"]
    with pytest.raises(EoprepError, match=r"encoder band 'swir16' has no source.*encoder.band_map"):
        map_bands(prithvi.info.bands, ["B02", "B03", "B04", "B08"], {})


def test_mosaiks_with_global_pooling_is_translation_tolerant_and_separates_covers():
    model = build_encoder("mosaiks", {"features": 64, "grid": 1}, ["a", "b"])
    rng = np.random.default_rng(0)
    texture = rng.normal(size=(2, 80, 80)).astype(np.float32)
    field = torch.from_numpy(texture)
    shifted = torch.roll(field, shifts=(7, 5), dims=(1, 2))
    bright = field * 0.3 + 2.0
    with torch.inference_mode():
        y = model(torch.stack([field, shifted, bright])[:, :, 8:72, 8:72])
    y = torch.nn.functional.normalize(y, dim=1)
    assert float(y[0] @ y[1]) > 0.98 > float(y[0] @ y[2])


def test_decoder_masks_clouds_composites_and_zeroes_missing_pixels():
    t, h = 3, 4
    raw = np.full((1, t, 2, h, h), 2000, dtype=np.uint16)
    raw[0, 1, 0] = 60000
    raw[0, 1, 1] = 9
    raw[0, :, 0, 0, 0] = 0
    decoder = ChipDecoder(
        band_index=[0],
        scale=[1e-4],
        offset=[-0.1],
        nodata=0,
        mean=[0.1],
        std=[0.05],
        mask_index=1,
        mask_invalid=[9],
        reduce="mean",
    )
    out = decoder(torch.from_numpy(raw.view(np.int16)))
    assert out.shape == (1, 1, h, h)
    assert float(out[0, 0, 0, 0]) == 0.0
    torch.testing.assert_close(out[0, 0, 1:, 1:], torch.zeros(h - 1, h - 1), atol=1e-5, rtol=0)
    resized = ChipDecoder(band_index=[0], scale=[1e-4], offset=[-0.1], nodata=0, mean=[0.0], std=[1.0], size=8)
    assert resized(torch.from_numpy(raw.view(np.int16))).shape == (1, 1, 8, 8)
    frames = ChipDecoder(
        band_index=[0],
        scale=[1e-4],
        offset=[-0.1],
        nodata=0,
        mean=[0.1],
        std=[0.05],
        mask_index=1,
        mask_invalid=[9],
        frames=2,
    )
    picked = frames(torch.from_numpy(raw.view(np.int16)))
    assert picked.shape == (1, 1, 2, h, h)
    torch.testing.assert_close(picked[0, 0, :, 1:, 1:], torch.zeros(2, h - 1, h - 1), atol=1e-5, rtol=0)


# Parameter names of the published architectures (checked against Prithvi-EO-2.0's prithvi_mae.py / terratorch's
# PrithviViT, Clay's Encoder in claymodel/model.py and src/model.py, and timm's VisionTransformer), one block deep.
TIMM_BLOCK = [
    f"blocks.0.{m}.{p}"
    for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    for p in ("weight", "bias")
]
CLAY_KEYS = [
    "cls_token",
    *(f"patch_embedding.fclayer.{m}.{p}" for m in ("l1", "l2") for p in ("weight", "bias")),
    "patch_embedding.weight_generator.weight_tokens",
    "patch_embedding.weight_generator.bias_token",
    *(
        f"patch_embedding.weight_generator.encoder.layers.0.{m}"
        for m in (
            "self_attn.in_proj_weight",
            "self_attn.in_proj_bias",
            "self_attn.out_proj.weight",
            "self_attn.out_proj.bias",
            "linear1.weight",
            "linear1.bias",
            "linear2.weight",
            "linear2.bias",
            "norm1.weight",
            "norm1.bias",
            "norm2.weight",
            "norm2.bias",
        )
    ),
    *(f"patch_embedding.weight_generator.{m}.{p}" for m in ("fc_weight", "fc_bias") for p in ("weight", "bias")),
    "transformer.norm.weight",
    "transformer.norm.bias",
    "transformer.layers.0.0.norm.weight",
    "transformer.layers.0.0.norm.bias",
    "transformer.layers.0.0.to_qkv.weight",
    "transformer.layers.0.0.to_out.weight",
    *(f"transformer.layers.0.1.net.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")),
]


def test_parameter_names_and_shapes_follow_the_published_architectures():
    vit = build_encoder("vit", {"arch": "vit-s", "depth": 1, "size": 224, "patch": 16}, S2)
    assert set(vit.state_dict()) == {
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        *TIMM_BLOCK,
        "norm.weight",
        "norm.bias",
    }
    assert vit.state_dict()["pos_embed"].shape == (1, 197, 384)
    assert vit.state_dict()["blocks.0.attn.qkv.weight"].shape == (1152, 384)

    prithvi = build_encoder("prithvi-eo-2", {"variant": "300m", "depth": 1}, S2).state_dict()
    assert set(prithvi) == {
        "cls_token",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        *TIMM_BLOCK,
        "norm.weight",
        "norm.bias",
    }
    assert prithvi["patch_embed.proj.weight"].shape == (1024, 6, 1, 16, 16)
    big = build_encoder("prithvi-eo-2", {"variant": "600m", "depth": 1}, S2).state_dict()
    assert big["patch_embed.proj.weight"].shape == (1280, 6, 1, 14, 14)

    clay = build_encoder("clay", {"variant": "base", "depth": 1}, S2).state_dict()
    assert set(clay) == set(CLAY_KEYS)
    assert clay["patch_embedding.weight_generator.fc_weight.weight"].shape == (768 * 8 * 8, 128)
    assert clay["patch_embedding.weight_generator.fc_bias.weight"].shape == (768, 128)
    assert clay["transformer.layers.0.0.to_qkv.weight"].shape == (3 * 12 * 64, 768)
    assert clay["transformer.layers.0.1.net.1.weight"].shape == (4 * 768, 768)


def test_prithvi_positions_put_x_then_y_then_time_channels():
    from eoprep.embed._prithvi import sincos_3d

    table = sincos_3d(64, 2, 3, 4)
    assert table.shape == (1, 1 + 2 * 3 * 4, 64)
    assert float(table[0, 0].abs().max()) == 0.0
    grid = table[0, 1:].reshape(2, 3, 4, 64)  # tokens run time, row, column
    x, y, t = grid[..., :24], grid[..., 24:48], grid[..., 48:]
    assert torch.equal(x, x[:1, :1].expand_as(x)) and not torch.equal(x, x[:, :, :1].expand_as(x))
    assert torch.equal(y, y[:1, :, :1].expand_as(y)) and not torch.equal(y, y[:, :1].expand_as(y))
    assert torch.equal(t, t[:, :1, :1].expand_as(t)) and not torch.equal(t, t[:1].expand_as(t))


def test_published_checkpoint_layouts_load_and_their_extra_parts_are_ignored(tmp_path):
    """Prithvi MAE (decoder, pos_embed, -TL scales), a Clay Lightning checkpoint (decoder, teacher), a timm head."""
    prithvi = build_encoder("prithvi-eo-2", {**CASES["prithvi-eo-2"], "seed": 1}, S2)
    state = {f"encoder.{k}": v for k, v in prithvi.state_dict().items()}
    state |= {
        "encoder.pos_embed": torch.zeros(1, 33, 32),
        "encoder.temporal_embed_enc.scale": torch.ones(1),
        "encoder.location_embed_enc.scale": torch.ones(1),
        "decoder.mask_token": torch.zeros(1, 1, 16),
        "decoder.decoder_embed.weight": torch.zeros(16, 32),
    }
    torch.save(state, tmp_path / "prithvi.pt")
    clay = build_encoder("clay", {**CASES["clay"], "seed": 1}, S2)
    state = {f"model.encoder.{k}": v for k, v in clay.state_dict().items()}
    state |= {"model.decoder.mask_patch": torch.zeros(16), "model.teacher.cls_token": torch.zeros(1, 1, 8)}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "clay.ckpt")
    vit = build_encoder("vit", {**CASES["vit"], "seed": 1}, S2)
    torch.save(
        {**vit.state_dict(), "head.weight": torch.zeros(10, 32), "head.bias": torch.zeros(10)}, tmp_path / "v.pt"
    )
    for name, model, file in [
        ("prithvi-eo-2", prithvi, "prithvi.pt"),
        ("clay", clay, "clay.ckpt"),
        ("vit", vit, "v.pt"),
    ]:
        loaded = build_encoder(name, {**CASES[name], "seed": 2}, S2, checkpoint=str(tmp_path / file))
        x = _input(model)
        with torch.inference_mode():
            torch.testing.assert_close(loaded(x), model(x))


def test_vit_takes_the_chip_bands_out_of_a_checkpoint_with_more_channels(tmp_path):
    all_bands = ["B01", *S2[:3], "B05", S2[3], "B09", *S2[4:]]
    full = build_encoder("vit", {**CASES["vit"], "bands": all_bands, "seed": 1}, all_bands)
    torch.save(full.state_dict(), tmp_path / "full.pt")
    params = {**CASES["vit"], "bands": S2, "checkpoint_bands": all_bands}
    part = build_encoder("vit", params, S2, checkpoint=str(tmp_path / "full.pt"))
    x = _input(part)
    padded = torch.zeros(len(x), len(all_bands), *x.shape[2:])
    padded[:, [all_bands.index(b) for b in S2]] = x
    with torch.inference_mode():
        torch.testing.assert_close(part(x), full(padded), atol=1e-5, rtol=1e-5)
    with pytest.raises(EoprepError, match=r"\['B8A'\] are not among checkpoint_bands"):
        build_encoder("vit", {**params, "bands": ["B8A"]}, S2, checkpoint=str(tmp_path / "full.pt"))


@pytest.mark.parametrize("name", ["prithvi", "clay", "vit"])
def test_shipped_embed_specs_build_their_encoders(name):
    """The example specs (their checkpoints are not shipped) parse and build, one block deep."""
    from pathlib import Path

    import yaml

    from eoprep.embed._spec import parse_embed_spec

    path = Path(__file__).parents[2] / "pipelines" / f"embed-{name}.yaml"
    data = yaml.safe_load(path.read_text())
    assert data["encoder"].pop("checkpoint")
    spec = parse_embed_spec(data, origin=str(path))
    model = build_encoder(spec.encoder.name, {**spec.encoder.params, "depth": 1}, S2)
    assert map_bands(model.info.bands, [*S2, "SCL"], spec.encoder.band_map)
    assert len(model.info.mean) == len(model.info.std) == len(model.info.bands)
