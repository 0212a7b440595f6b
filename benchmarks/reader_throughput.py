"""Training-reader throughput: Zarr (lossless, lossy) and TACO vs reading the source COG windows, same run.

One run on this machine:

* outputs: 115 chips of 1280 m from the benchmark archive that ``pipeline_throughput.py`` also uses,
  written by ``run_pipeline`` (real pgstac API, LocalCluster): Zarr with the default lossless
  compressor (blosc-lz4) + TACO shards, and Zarr once per lossy codec (``output.codec``; by default
  h265 quality 20, the video codec that stores least, and LERC at 50 dB PSNR, an error-bounded
  scientific codec);
* readers: ``ChipIterableDataset`` in a ``DataLoader`` (batch 4, ``collate_fn=collate_chips``) with 0 and
  2 workers (persistent), all groups (s2 + s1); one Zarr row with PyTorch's default collate shows what
  ``collate_chips`` saves; the median of 3 epochs, the loaders taking turns; MB/s counts decoded pixel bytes;
* baseline: the same chips read as windows from the source COGs with rasterio (every scene and band of
  the chip, onto the chip grid), in the same DataLoader settings. Handles (and GDAL's block cache) live
  for one epoch, so every tile is decoded once per epoch, as with an archive larger than the cache; a
  second row keeps them across epochs, where this small archive is then read from decoded blocks in RAM;
* decode alone: each Zarr codec's stored chunks decoded in one thread, no reads and no collate, the floor
  under any reader of that codec (printed with the most it allows against the COG window reads);
* CNN: a small conv net training step on the s2 batches; the ratio is (epoch time fed by a 2-worker
  DataLoader) / (the same steps on batches already in memory). Near 1 means the reader keeps up.

    .venv/bin/python benchmarks/reader_throughput.py [--codec '{"name": "h265", "quality": 20}' ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
import xarray as xr
from pipeline_throughput import ARCHIVE_BBOX
from rasterio.enums import Resampling
from rasterio.windows import from_bounds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from eoprep.catalog_server import LocalStacServer, default_data_dir
from eoprep.config import parse_spec
from eoprep.demo import DEMO_DATETIME, S1_COLLECTION, S2_COLLECTION
from eoprep.embedded import demo_archive
from eoprep.pipeline import run_pipeline
from eoprep.readers import ChipIterableDataset, collate_chips
from eoprep.runtime import dask_client

# 115 chips: an epoch of a few dozen batches, so per-epoch start-up of the workers does not dominate.
AOI = (9.02, 45.42, 9.16, 45.55)

GROUPS = {"s2": (S2_COLLECTION, ["B02", "B03", "B04", "B08", "B11", "B12", "SCL"]), "s1": (S1_COLLECTION, ["vv", "vh"])}


def spec_for(out: Path, *, fmt: str, codec: dict[str, Any] | None) -> Any:
    return parse_spec(
        {
            "name": "reader-bench",
            "source": {
                "url": "embedded",
                "collections": [{"id": cid, "name": key, "bands": bands} for key, (cid, bands) in GROUPS.items()],
                "aoi": {"bbox": list(AOI)},
                "datetime": DEMO_DATETIME,
            },
            "grid": {"cell_size": 1280, "pixel_size": 10},
            "time": {"mode": "scenes", "max_scenes": 8},
            "output": {
                "path": str(out),
                "chips_per_shard": 8,
                "format": fmt,
                "codec": codec,
                "taco_shard_size": "64MB",
            },
        }
    )


class CogWindows(IterableDataset):
    """The baseline: each chip read from the source COGs (one window per scene and band), no eoprep output.

    ``fresh=True`` (the baseline the ratios use): every epoch opens the COGs anew in every worker, so
    each tile is decoded once per epoch, as it is when the archive is larger than GDAL's block cache.
    ``fresh=False`` keeps the handles, and with them GDAL's cache of decoded blocks, across epochs:
    on this small archive later epochs then copy decoded blocks from RAM instead of reading the COGs.
    """

    def __init__(self, store: Path, hrefs: dict[str, dict[str, dict[str, str]]], *, fresh: bool = True) -> None:
        self.chips = []
        for key in GROUPS:
            ds = xr.open_zarr(store, group=key).drop_vars("pixels")
            for i in range(ds.sizes["chip"]):
                if len(self.chips) <= i:
                    self.chips.append({"transform": ds["transform"].values[i], "size": ds.sizes["x"], "items": {}})
                self.chips[i]["items"][key] = json.loads(str(ds["item_ids"].values[i]))
        self.hrefs = hrefs
        self.fresh = fresh
        self.handles: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "handles": {}}

    def __iter__(self) -> Any:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        n = len(self.chips)
        try:
            for chip in self.chips[worker * n // workers : (worker + 1) * n // workers]:
                yield self.read(chip)
        finally:
            if self.fresh:
                for handle in self.handles.values():
                    handle.close()
                self.handles.clear()

    def read(self, chip: dict[str, Any]) -> dict[str, Any]:
        x0, res, _, y0, _, _ = chip["transform"]
        size = chip["size"]
        bounds = (x0, y0 - size * res, x0 + size * res, y0)
        out = {}
        for key, (_, bands) in GROUPS.items():
            planes = []
            for item in chip["items"][key]:
                for band in bands:
                    href = self.hrefs[key][item][band]
                    if href not in self.handles:
                        self.handles[href] = rasterio.open(href)
                    src = self.handles[href]
                    window = from_bounds(*bounds, transform=src.transform)
                    planes.append(src.read(1, window=window, out_shape=(size, size), resampling=Resampling.nearest))
            out[key] = torch.from_numpy(np.stack(planes))
        return {"pixels": out}


def epoch(loader: DataLoader) -> tuple[int, int, float]:
    start = time.perf_counter()
    n = nbytes = 0
    for batch in loader:
        for t in batch["pixels"].values():
            nbytes += t.numel() * t.element_size()
        n += len(next(iter(batch["pixels"].values())))
    return n, nbytes, time.perf_counter() - start


ROUNDS = 3

LOSSY_CODECS = [{"name": "h265", "quality": 20}, {"name": "lerc", "target_psnr": 50}]


def measure(readers: dict[str, tuple[Any, Any]], results: dict[str, Any]) -> None:
    """Median of ``ROUNDS`` epochs per loader, the loaders taking turns in every round.

    On a shared 2-core machine the speed drifts by tens of percent over a minute; taking turns puts
    each reader and its baseline under the same drift, and the median drops the odd slow epoch.
    Workers persist across epochs, so their start-up is not counted; one warm-up epoch each first.
    """
    loaders = {
        f"{name} w{workers}": DataLoader(
            make(), batch_size=4, num_workers=workers, persistent_workers=workers > 0, collate_fn=collate
        )
        for name, (make, collate) in readers.items()
        for workers in (0, 2)
    }
    epochs: dict[str, list[tuple[int, int, float]]] = {key: [] for key in loaders}
    for loader in loaders.values():
        epoch(loader)
    for _ in range(ROUNDS):
        for key, loader in loaders.items():
            epochs[key].append(epoch(loader))
    for key, runs in epochs.items():
        n, nbytes, seconds = sorted(runs, key=lambda r: r[2])[len(runs) // 2]
        results[key] = {"samples_per_s": n / seconds, "mb_per_s": nbytes / 1e6 / seconds, "n": n}
        print(f"{key:<30} {n / seconds:8.1f} samples/s  {nbytes / 1e6 / seconds:8.1f} MB/s")
    del loaders


def decode_only_ms(out: Path) -> float:
    """Milliseconds per sample (every group of a chip) of decoding its stored chunks alone, one thread:
    no file reads, no collate. A reader cannot be faster than this, whatever it does around the codec."""
    import zarr

    from eoprep.shard_format import EMPTY, ShardFormat

    groups = []
    for key in GROUPS:
        arr = zarr.open_array(out / "chips.zarr", path=f"{key}/pixels", mode="r")
        fmt = ShardFormat.from_metadata(arr.metadata.to_dict(), arr.fill_value)
        payloads = []
        for shard in (out / "chips.zarr" / key / "pixels" / "c").iterdir():
            data = (shard / "0/0/0/0").read_bytes()
            index = fmt.shard_index(data[-fmt.index_nbytes :])
            payloads += [data[o : o + n] for o, n in index.tolist() if o != int(EMPTY)]
        groups.append((fmt, np.empty(fmt.shape, dtype=fmt.dtype), payloads))
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for fmt, buffer, payloads in groups:
            for payload in payloads:
                fmt.decode(payload, buffer)
        best = min(best, time.perf_counter() - start)
    return 1e3 * best / len(groups[0][2])


class SmallCNN(torch.nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels, 32, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 32, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(32, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def to_input(batch: dict[str, Any]) -> torch.Tensor:
    s2 = batch["pixels"]["s2"]
    return s2.reshape(s2.shape[0], -1, *s2.shape[-2:]).to(torch.float32) / 10000


def cnn_ratio(make: Any) -> dict[str, float]:
    """A 2-worker DataLoader feeding a small CNN: epoch time over compute-only time, and time spent waiting.

    ``ratio`` is (epoch fed by the DataLoader) / (the same steps on batches already in memory);
    ``wait_fraction`` is the share of the fed epoch the training loop spent blocked on the next batch,
    i.e. reader-bound time. On 2 cores the two workers also take CPU from the training step, which
    raises ``ratio`` without the loop ever waiting.
    """
    cached = [to_input(b) for b in DataLoader(make(), batch_size=4, num_workers=0, collate_fn=collate_chips)]
    model = SmallCNN(cached[0].shape[1])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step(x: torch.Tensor) -> None:
        opt.zero_grad()
        model(x).logsumexp(1).mean().backward()
        opt.step()

    step(cached[0])
    start = time.perf_counter()
    for x in cached:
        step(x)
    compute = time.perf_counter() - start
    loader = DataLoader(make(), batch_size=4, num_workers=2, persistent_workers=True, collate_fn=collate_chips)
    for batch in loader:
        step(to_input(batch))
    waiting = 0.0
    start = time.perf_counter()
    batches = iter(loader)
    while True:
        asked = time.perf_counter()
        batch = next(batches, None)
        waiting += time.perf_counter() - asked
        if batch is None:
            break
        step(to_input(batch))
    fed = time.perf_counter() - start
    print(
        f"small CNN: {compute:.2f} s on cached batches, {fed:.2f} s fed by 2 workers (ratio {fed / compute:.2f}), "
        f"{waiting / fed:.0%} of it waiting for batches"
    )
    return {"compute_s": compute, "fed_s": fed, "ratio": fed / compute, "wait_fraction": waiting / fed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codec", action="append", help="a lossy output.codec (JSON); repeat for several")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    codecs = [json.loads(c) for c in args.codec] if args.codec else LOSSY_CODECS
    torch.set_num_threads(1)
    archive = demo_archive(default_data_dir() / "bench-archive", bbox=ARCHIVE_BBOX, say=print)
    hrefs: dict[str, dict[str, dict[str, str]]] = {key: {} for key in GROUPS}
    for item in archive.items:
        for key, (cid, bands) in GROUPS.items():
            if item["collection"] == cid:
                hrefs[key][item["id"]] = {b: item["assets"][b]["href"].removeprefix("file://") for b in bands}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with LocalStacServer(root / "catalog") as server, dask_client(workers=2, say=lambda _m: None) as client:
            server.load(archive.collections, archive.items)
            outputs = [("lossless", "taco", None)] + [(f"lossy{i}", "zarr", c) for i, c in enumerate(codecs)]
            for name, fmt, codec in outputs:
                summary = run_pipeline(
                    spec_for(root / name, fmt=fmt, codec=codec), client=client, catalog_url=server.url, say=print
                )
                print(f"{name}: {summary.chips_written} chips, {summary.bytes_written / 1e6:.1f} MB stored")
        lossless = root / "lossless"
        readers = {
            "COG windows (rasterio)": (lambda: CogWindows(lossless / "chips.zarr", hrefs), None),
            "COG windows, kept cache": (lambda: CogWindows(lossless / "chips.zarr", hrefs, fresh=False), None),
            "Zarr blosc-lz4": (lambda: ChipIterableDataset(lossless, format="zarr", seed=0), collate_chips),
            "Zarr, default collate": (lambda: ChipIterableDataset(lossless, format="zarr", seed=0), None),
            "TACO": (lambda: ChipIterableDataset(lossless, format="taco", seed=0), collate_chips),
        }
        for i, codec in enumerate(codecs):
            lossy = root / f"lossy{i}"
            readers[f"Zarr {codec['name']}"] = (
                lambda out=lossy: ChipIterableDataset(out, format="zarr"),
                collate_chips,
            )
        measure(readers, results)
        for key, value in list(results.items()):
            base = results[f"COG windows (rasterio) {key.rsplit(' ', 1)[1]}"]["samples_per_s"]
            value["x_cog"] = value["samples_per_s"] / base
            print(f"{key:<30} {value['x_cog']:6.1f}x the COG window reads")
        cog_ms = 1e3 / results["COG windows (rasterio) w0"]["samples_per_s"]
        print(f"decoding alone, one thread (a reader's floor; 5x the COG window reads leaves {cog_ms / 5:.1f} ms):")
        for name, out in [("Zarr blosc-lz4", lossless)] + [
            (f"Zarr {codec['name']}", root / f"lossy{i}") for i, codec in enumerate(codecs)
        ]:
            ms = decode_only_ms(out)
            results[f"{name} decode only"] = {"ms_per_sample": ms, "max_x_cog": cog_ms / ms}
            print(f"{name:<30} {ms:6.2f} ms per sample, at most {cog_ms / ms:5.1f}x the COG window reads")
        results["cnn_zarr"] = cnn_ratio(lambda: ChipIterableDataset(lossless, format="zarr", groups=["s2"]))
        results["cnn_taco"] = cnn_ratio(lambda: ChipIterableDataset(lossless, format="taco", groups=["s2"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
