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
