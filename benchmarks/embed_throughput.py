"""Embedding throughput: chips/s end to end (Zarr → Dask worker → encoder → feature store) against the
pure-model bound (the same model on the same batch, already decoded and on the device), in one run.

Makes its own input from the demo landscape (no STAC server, no download), so it runs on any machine
with the repository and its venv::

    python benchmarks/embed_throughput.py --device cpu --encoder mosaiks
    python benchmarks/embed_throughput.py --device cuda --encoder vit-b

Prints a table and one JSON line (with the device name); a row for the reader threads alone says whether
reading or the rest of the job holds the end-to-end rate below the model's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import dask.array
import numpy as np
import pandas as pd
import torch
import xarray as xr
import zarr
from distributed import Client, LocalCluster

from eoprep.demo._landscape import Landscape
from eoprep.embed import build_encoder, embed, parse_embed_spec

BANDS = ["B02", "B03", "B04", "B08", "B11", "B12", "SCL"]
ENCODERS: dict[str, dict[str, Any]] = {
    "mosaiks": {"name": "mosaiks", "params": {}},
    "vit-s": {"name": "vit", "params": {"arch": "vit-s", "size": 224}},
    "vit-b": {"name": "vit", "params": {"arch": "vit-b", "size": 224}},
    "prithvi": {"name": "prithvi-eo-2", "params": {"variant": "300m", "frames": 4, "size": 224}},
    "clay": {"name": "clay", "params": {"variant": "base", "size": 256}},
}


def make_chips(root: Path, n: int, size: int, n_time: int, seed: int = 0, unique: int = 512) -> Path:
    """An eoprep-shaped chip group (``s2``) of ``n`` chips: ``unique`` of them sampled from the demo landscape,
    repeated shard by shard (a GPU run needs tens of thousands of chips to last seconds; making each one
    would take minutes and add nothing the reader or the model would notice)."""
    per_shard = 8
    unique = max(per_shard, min(unique, n) // per_shard * per_shard)
    rng = np.random.default_rng(seed)
    land = Landscape(x_min=0.0, y_min=0.0, extent=50_000.0, seed=seed)
    pixels = np.zeros((unique, n_time, len(BANDS), size, size), dtype=np.uint16)
    for i in range(unique):
        x0, y0 = rng.uniform(0, 50_000 - size * 10, 2)
        x = x0 + (np.arange(size) + 0.5)[None, :] * 10
        y = y0 + (np.arange(size) + 0.5)[:, None] * 10
        site = land.site(x, y)
        for t in range(n_time):
            refl = land.reflectance(site, 120 + 10 * t)
            pixels[i, t, :6] = np.clip((refl + 0.1) * 10_000, 1, 65_535).astype(np.uint16)
            pixels[i, t, 6] = 4
    ids = [f"BENCH{i:05d}_20240501-20240531" for i in range(n)]
    start = np.full(n, np.datetime64("2024-05-01"), dtype="datetime64[ns]")
    lazy = dask.array.zeros((n, *pixels.shape[1:]), dtype=np.uint16, chunks=(per_shard, *pixels.shape[1:]))
    ds = xr.Dataset(
        {"pixels": (("chip", "time", "band", "y", "x"), lazy, {"collection": "bench-s2", "nodata": 0})},
        coords={
            "chip": ("chip", np.array(ids, dtype=object)),
            "cell": ("chip", np.array([i.split("_")[0] for i in ids], dtype=object)),
            "footprint": ("chip", np.array(["POLYGON ((9 45, 9.01 45, 9.01 45.01, 9 45.01, 9 45))"] * n, dtype=object)),
            "window_start": ("chip", start),
            "window_end": ("chip", start + np.timedelta64(30, "D")),
            "written": ("chip", np.ones(n, dtype=bool)),
            "valid_fraction": ("chip", np.ones(n, dtype=np.float32)),
            "cloud_fraction": ("chip", np.zeros(n, dtype=np.float32)),
            "band": ("band", np.array(BANDS, dtype=object)),
            "scale": ("band", np.array([1e-4] * 6 + [1.0])),
            "offset": ("band", np.array([-0.1] * 6 + [0.0])),
        },
    )
    inner = (1, n_time, len(BANDS), size, size)
    encoding = {"pixels": {"chunks": inner, "shards": (per_shard, *inner[1:]), "fill_value": np.uint16(0)}}
    url = root / "chips.zarr"
    ds.to_zarr(url, group="s2", mode="w", zarr_format=3, consolidated=True, encoding=encoding, compute=False)
    arr = zarr.open_array(url, path="s2/pixels", mode="r+")
    arr[: min(unique, n)] = pixels[: min(unique, n)]
    shard_file = [url / arr.path / arr.metadata.encode_chunk_key((s, 0, 0, 0, 0)) for s in range(-(-n // per_shard))]
    for s in range(unique // per_shard, len(shard_file)):
        shard_file[s].parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shard_file[s % (unique // per_shard)], shard_file[s])
    return root


def _spec(chips: Path, store: Path, encoder: dict[str, Any], device: str, batch: str) -> Any:
    return parse_embed_spec(
        {
            "name": "bench",
            "input": {"path": str(chips), "group": "s2", "mask": {"band": "SCL", "invalid": [0, 3, 8, 9, 10]}},
            "encoder": encoder,
            "runtime": {
                "device": device,
                "batch_size": batch if batch == "auto" else int(batch),
            },
            "output": {"path": str(store)},
        }
    )


def pure_model(encoder: dict[str, Any], chips: Path, device: torch.device, batch: int, seconds: float) -> float:
    """Chips/s of decoder-free model calls on one decoded batch that already sits on the device."""
    from eoprep.embed import ChipDecoder

    model = build_encoder(encoder["name"], encoder["params"], BANDS[:6]).to(device).eval()
    info = model.info
    raw = xr.open_zarr(chips / "chips.zarr", group="s2")["pixels"].values[:batch]
    decoder = ChipDecoder(
        band_index=range(6),
        scale=[1e-4] * 6,
        offset=[-0.1] * 6,
        nodata=0,
        mean=info.mean,
        std=info.std,
        frames=info.frames,
        size=info.size,
    ).to(device)
    x = decoder(torch.from_numpy(raw.view(np.int16)).to(device))
    meta = torch.zeros(len(x), 3, device=device)
    amp = device.type == "cuda" and torch.cuda.is_bf16_supported()
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        model(x, meta)
        _sync(device)
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds or calls < 3:
            model(x, meta)
            calls += 1
        _sync(device)
    return calls * len(x) / (time.perf_counter() - started)


def host_reading(chips: Path, n: int, batch: int, *, pin: bool) -> float:
    """Chips/s of one worker's reader threads alone (default thread count), into pinned batches on CUDA:
    above the pure-model bound, reading is not what holds the end-to-end run back."""
    from eoprep.embed._run import EncodeTask, _batches

    task = EncodeTask(
        store_url=str(chips / "chips.zarr"),
        group="s2",
        positions=tuple(range(n)),
        meta=((0.0, 0.0, 0.0),) * n,
        encoder="",
        params={},
        checkpoint=None,
        input_bands=(),
        decoder={},
        device="cuda" if pin else "cpu",
        batch_size=batch,
        precision="auto",
        read_threads="auto",
    )
    for _ in _batches(task, batch, pin):  # warm: page cache, pinned-memory pool
        pass
    started = time.perf_counter()
    count = sum(len(raw) for raw, _, _ in _batches(task, batch, pin))
    return count / (time.perf_counter() - started)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--encoder", choices=sorted(ENCODERS), default="mosaiks")
    parser.add_argument("--chips", type=int, default=None, help="chips to encode (default 64 on CPU, 16384 on CUDA)")
    parser.add_argument("--size", type=int, default=128, help="chip side in pixels")
    parser.add_argument("--time", type=int, default=4, help="scenes per chip")
    parser.add_argument("--batch", default=None, help="batch size or 'auto' (default: 16 on CPU, auto on CUDA)")
    parser.add_argument("--workers", type=int, default=None, help="CPU worker processes (default: CPU cores, max 8)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    n = args.chips or (16384 if cuda else 64)
    batch = args.batch or ("auto" if cuda else "16")
    workers = 1 if cuda else (args.workers or min(os.cpu_count() or 1, 8))
    encoder = ENCODERS[args.encoder]
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(0) if cuda else (platform.processor() or platform.machine())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_chips(root / "chips", n, args.size, args.time)
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
            resources={"GPU": 1} if cuda else None,
            env={"OMP_NUM_THREADS": "1"} if not cuda else {},
        )
        with cluster, Client(cluster) as client:
            embed(_spec(root / "chips", root / "warm", encoder, args.device, batch), client=client, say=lambda _m: None)
            started = time.perf_counter()
            summary = embed(
                _spec(root / "chips", root / "store", encoder, args.device, batch), client=client, say=lambda _m: None
            )
            e2e = n / (time.perf_counter() - started)
        torch.set_num_threads(workers if not cuda else torch.get_num_threads())
        bound_batch = 16 if batch == "auto" and not cuda else (256 if batch == "auto" else int(batch))
        bound = pure_model(encoder, root / "chips", device, min(bound_batch, n), 5.0)
        reading = host_reading(root / "chips", n, min(bound_batch, n), pin=cuda)
    result = {
        "device": args.device,
        "device_name": name,
        "encoder": args.encoder,
        "model_version": summary.model_version,
        "dimension": summary.dimension,
        "chips": n,
        "chip_shape": [args.time, len(BANDS), args.size, args.size],
        "workers": workers,
        "end_to_end_chips_per_s": round(e2e, 2),
        "pure_model_chips_per_s": round(bound, 2),
        "host_reading_chips_per_s": round(reading, 2),
        "ratio": round(e2e / bound, 3),
    }
    table = pd.DataFrame(
        {"chips/s": [e2e, bound, reading], "vs bound": [e2e / bound, 1.0, reading / bound]},
        index=["end to end (zarr → store)", "pure model (batch on device)", "reading alone (zarr → host batches)"],
    )
    print(f"{args.encoder} {summary.model_version} on {args.device} ({name}), {n} chips {result['chip_shape']}")
    print(table.round(3).to_string())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
