"""The embed job: chips of an eoprep output → encoder tasks on Dask workers → feature store.

Each task takes a run of chip positions; reader threads decompress their raw integers, a shard at a
time, straight into pinned batch buffers (decompression overlaps compute), which are copied on a side
CUDA stream while the previous batch is encoded; decoding (scale, mask, composite, normalise, resize)
happens on the device. Models are built once per worker process and reused by later tasks.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
import torch
import xarray as xr
import zarr
from distributed import Client, as_completed

from eoprep import __version__
from eoprep.embed._base import ChipDecoder, map_bands
from eoprep.embed._registry import build_encoder
from eoprep.embed._spec import EmbedSpec
from eoprep.embed._store import FeatureStore
from eoprep.errors import EoprepError
from eoprep.runtime import ClientLike, resolve_client
from eoprep.shard_format import ShardFormat
from eoprep.sinks import consecutive_runs

__all__ = ["EmbedSummary", "EncodeTask", "embed", "encode_chips"]

CHIPS_STORE = "chips.zarr"


@dataclass(frozen=True)
class EncodeTask:
    """Everything a worker needs to encode some chips: plain picklable values."""

    store_url: str
    group: str
    positions: tuple[int, ...]
    meta: tuple[tuple[float, float, float], ...]
    encoder: str
    params: dict[str, Any]
    checkpoint: str | None
    input_bands: tuple[str, ...]
    decoder: dict[str, Any]
    device: str
    batch_size: int | str
    precision: str
    read_threads: int | str


@dataclass
class EmbedSummary:
    """What an embed run did; printed by the CLI."""

    store: str
    model: str
    model_version: str
    dimension: int
    device: str
    chips_encoded: int = 0
    chips_present: int = 0
    chips_skipped: int = 0
    rows: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def chips_per_s(self) -> float:
        return self.chips_encoded / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "chips_per_s": self.chips_per_s}


_MODELS: dict[str, tuple[torch.nn.Module, ChipDecoder, torch.device]] = {}
#: ``auto`` batch size of the worker's model by precision: measured once, not per task.
_AUTO_BATCH: dict[str, int] = {}


def _prepared(task: EncodeTask) -> tuple[torch.nn.Module, ChipDecoder, torch.device]:
    """The model and decoder of a task, built once per worker process and kept on its device."""
    key = json.dumps(
        [task.encoder, task.params, task.checkpoint, task.input_bands, task.decoder, task.device],
        sort_keys=True,
        default=str,
    )
    if key not in _MODELS:
        device = torch.device(task.device)
        model = build_encoder(task.encoder, task.params, task.input_bands, task.checkpoint).to(device)
        decoder = ChipDecoder(**task.decoder).to(device)
        _MODELS.clear()
        _AUTO_BATCH.clear()
        _MODELS[key] = (model, decoder, device)
    return _MODELS[key]


# Torch has no unsigned 16/32/64-bit tensors a device copy takes: such chips travel as the signed type of
# the same width and the decoder reinterprets them (``unsigned_bits``).
_SIGNED = {np.dtype(f"uint{bits}"): np.dtype(f"int{bits}") for bits in (16, 32, 64)}


class _PixelReader:
    """Raw chips of one pixel array, decoded straight into a batch buffer, one shard's chips per call.

    Our sharded layout is read with `ShardFormat.read_chips` (the chips of a shard in two reads, decoded
    in place, the GIL released while they decompress, so reader threads scale with cores); any other
    layout through zarr.
    """

    def __init__(self, url: str, group: str) -> None:
        import fsspec

        self._arr = zarr.open_array(url, path=f"{group}/pixels", mode="r")
        self._fmt = ShardFormat.from_metadata(self._arr.metadata.to_dict(), self._arr.fill_value)
        self._fs, self._root = fsspec.core.url_to_fs(url)
        self._url = url
        self.shape: tuple[int, ...] = tuple(self._arr.shape[1:])
        self.dtype = np.dtype(self._arr.dtype)
        self.per_call = self._fmt.chips if self._fmt is not None else int(self._arr.chunks[0])

    def buffer(self, n: int, *, pin: bool) -> torch.Tensor:
        """An uninitialised host tensor for ``n`` chips (pinned for asynchronous copies to a GPU)."""
        dtype = torch.from_numpy(np.empty(0, dtype=_SIGNED.get(self.dtype, self.dtype))).dtype
        return torch.empty((n, *self.shape), dtype=dtype, pin_memory=pin)

    def parts(self, positions: list[int]) -> list[tuple[slice, list[int]]]:
        """``positions`` cut into runs within one shard: (slice of the batch, positions)."""
        cuts = [0] + [
            k for k in range(1, len(positions)) if positions[k] // self.per_call != positions[k - 1] // self.per_call
        ]
        bounds = [*cuts, len(positions)]
        return [(slice(a, b), positions[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def read(self, positions: list[int], out: np.ndarray) -> None:
        """Decode the chips at ``positions`` (all in one shard) into ``out`` (a `buffer`'s array, or part of it)."""
        out = out.view(self.dtype)
        if self._fmt is None:
            done = 0
            for run in consecutive_runs(positions):
                out[done : done + len(run)] = self._arr[run.start : run.stop]
                done += len(run)
            return
        shard = positions[0] // self._fmt.chips
        key = f"{self._arr.path}/{self._arr.metadata.encode_chunk_key((shard, *[0] * len(self.shape)))}"
        path = f"{self._root.rstrip('/')}/{key}"
        try:
            self._fmt.read_chips(self._fs, path, [p % self._fmt.chips for p in positions], out)
        except FileNotFoundError:
            raise EoprepError(
                f"input: shard {self._url.rstrip('/')}/{key} is missing, but its chips are recorded as written; "
                "re-run `eoprep run` on that output or restore the file"
            ) from None


def _read_threads(requested: int | str) -> int:
    """Reader threads of a task: ``auto`` is one per core the worker may use, at most 16.

    On a 16-core H200 node, reading alone gave 4.8-6.1k chips/s with 8 threads and 9.2-9.5k with 16
    (4×7×128² uint16 chips, zstd): a ViT-B there encodes ~8.5k chips/s.
    """
    if requested != "auto":
        return int(requested)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(16, cores))


#: Batches being read ahead of the one the model encodes: their chips keep every reader thread busy.
_BATCHES_AHEAD = 2


def _batches(task: EncodeTask, batch_size: int, pin: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """Host batches (raw, meta, count), read ahead by reader threads a shard at a time into (pinned) buffers."""
    reader = _PixelReader(task.store_url, task.group)
    positions = list(task.positions)
    meta = np.asarray(task.meta, dtype=np.float32).reshape(-1, 3)
    chunks = [(positions[i : i + batch_size], meta[i : i + batch_size]) for i in range(0, len(positions), batch_size)]

    with ThreadPoolExecutor(_read_threads(task.read_threads)) as pool:

        def start(chunk: tuple[list[int], np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, list[Any]]:
            pos, m = chunk
            raw = reader.buffer(len(pos), pin=pin)
            out = raw.numpy()
            jobs = [pool.submit(reader.read, part, out[where]) for where, part in reader.parts(pos)]
            meta_t = torch.from_numpy(m)
            return raw, meta_t.pin_memory() if pin else meta_t, jobs

        ahead = deque(start(c) for c in chunks[: _BATCHES_AHEAD + 1])
        queued = len(ahead)
        while ahead:
            raw, meta_t, jobs = ahead.popleft()
            if queued < len(chunks):
                ahead.append(start(chunks[queued]))
                queued += 1
            for job in jobs:
                job.result()
            yield raw, meta_t, len(raw)


def _on_device(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor, int]], device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """Copy each batch on a side stream while the previous one is encoded (CUDA); plain pass-through on CPU."""
    if device.type != "cuda":
        yield from batches
        return
    stream = torch.cuda.Stream(device)
    pending: tuple[torch.Tensor, torch.Tensor, int, torch.cuda.Event] | None = None
    for raw, meta, n in batches:
        with torch.cuda.stream(stream):
            copied = (raw.to(device, non_blocking=True), meta.to(device, non_blocking=True), n, torch.cuda.Event())
            copied[3].record(stream)
        if pending is not None:
            yield _ready(pending)
        pending = copied
    if pending is not None:
        yield _ready(pending)


def _ready(item: tuple[torch.Tensor, torch.Tensor, int, torch.cuda.Event]) -> tuple[torch.Tensor, torch.Tensor, int]:
    raw, meta, n, event = item
    current = torch.cuda.current_stream(raw.device)
    current.wait_event(event)
    raw.record_stream(current)
    meta.record_stream(current)
    return raw, meta, n


def _autocast(device: torch.device, precision: str) -> torch.autocast:
    if precision == "auto":
        precision = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "float32")


def auto_batch_size(
    model: torch.nn.Module, decoder: ChipDecoder, sample: torch.Tensor, device: torch.device, precision: str
) -> int:
    """Chips per batch: 32 on CPU; on CUDA, what half the free memory holds (measured on two chips), at most 256.

    A bigger batch keeps a GPU no busier, and delays it: the first batch of a task is read before
    anything runs, and a task of one batch never overlaps reading with encoding.

    Parameters
    ----------
    model, decoder : torch.nn.Module
        The encoder and its decoder, on ``device``.
    sample : torch.Tensor
        Raw values of at least one chip ``(n, T, C, H, W)``.
    device : torch.device
        Where they run.
    precision : str
        As in the spec's ``runtime.precision``.

    Returns
    -------
    int
        A power of two between 1 and 256.
    """
    if device.type != "cuda":
        return 32
    probe = sample[:1].to(device).expand(2, *sample.shape[1:]).contiguous()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with torch.inference_mode(), _autocast(device, precision):
        model(decoder(probe), torch.zeros(2, 3, device=device))
    torch.cuda.synchronize(device)
    per_chip = max((torch.cuda.max_memory_allocated(device) - base) / 2, 1)
    free, _ = torch.cuda.mem_get_info(device)
    fits = int(0.5 * free / per_chip)
    return int(2 ** np.clip(np.floor(np.log2(max(fits, 1))), 0, 8))


def encode_chips(task: EncodeTask) -> np.ndarray:
    """Worker task: the embeddings ``(len(task.positions), dim)`` of some chips, as float32.

    Parameters
    ----------
    task : EncodeTask
        Chips, encoder and device.

    Returns
    -------
    numpy.ndarray
        One row per position, in the task's order.
    """
    model, decoder, device = _prepared(task)
    batch_size = task.batch_size
    if batch_size == "auto":
        if task.precision not in _AUTO_BATCH:
            reader = _PixelReader(task.store_url, task.group)
            sample = reader.buffer(1, pin=False)
            reader.read([task.positions[0]], sample.numpy())
            _AUTO_BATCH[task.precision] = auto_batch_size(model, decoder, sample, device, task.precision)
        batch_size = _AUTO_BATCH[task.precision]
    # The vectors stay on the device until the task ends: a copy of each batch's vectors to (pageable)
    # host memory would make the loop wait for that batch's encoding before it queues the next one.
    out: list[torch.Tensor] = []
    with torch.inference_mode(), _autocast(device, task.precision):
        for raw, meta, _ in _on_device(_batches(task, int(batch_size), device.type == "cuda"), device):
            out.append(model(decoder(raw), meta).float())
    return torch.cat(out).cpu().numpy()


def _resolve_device(client: Client, wanted: str) -> tuple[str, dict[str, float] | None, str, int]:
    """Device of the tasks, their Dask resources, a note for the user and how many workers may run them.

    Workers that declare a ``GPU`` resource get the tasks with ``resources={"GPU": 1}``; without
    such workers the tasks go to any worker, on CUDA only if the workers see a GPU.
    """
    workers = list(client.scheduler_info(n_workers=-1)["workers"].values())
    gpus = sum(w.get("resources", {}).get("GPU", 0) > 0 for w in workers)
    if wanted == "cpu":
        return "cpu", None, "device cpu", len(workers)
    if gpus:
        return "cuda", {"GPU": 1}, "device cuda on workers with the GPU resource", gpus
    seen = any(client.run(torch.cuda.is_available).values())
    if seen:
        note = "device cuda (workers see a GPU but declare no GPU resource; tasks go to any worker)"
        return "cuda", None, note, len(workers)
    if wanted == "cuda":
        raise EoprepError(
            "runtime.device: cuda, but no Dask worker declares a GPU resource or sees a CUDA device; "
            "start workers with `dask worker ADDRESS --resources GPU=1` on a GPU machine, or set device: cpu"
        )
    return "cpu", None, "device cpu (no worker has a GPU)", len(workers)


def _chip_frame(ds: xr.Dataset, collection: str) -> gpd.GeoDataFrame:
    footprints = shapely.from_wkt([str(v) for v in ds["footprint"].values])
    return gpd.GeoDataFrame(
        {
            "id": [str(v) for v in ds["chip"].values],
            "collection": ds.attrs.get("group", ""),
            "sensor": collection,
            "cell": [str(v) for v in ds["cell"].values],
            "start_datetime": pd.DatetimeIndex(ds["window_start"].values).tz_localize("UTC"),
            "end_datetime": pd.DatetimeIndex(ds["window_end"].values).tz_localize("UTC"),
            "valid_fraction": ds["valid_fraction"].values.astype(np.float32),
            "cloud_fraction": ds["cloud_fraction"].values.astype(np.float32),
        },
        geometry=footprints,
        crs="EPSG:4326",
    )


def _chip_meta(frame: gpd.GeoDataFrame) -> np.ndarray:
    """Per chip: centre latitude, longitude and day of year of the window's middle (for Clay)."""
    bounds = frame.geometry.bounds
    middle = frame["start_datetime"] + (frame["end_datetime"] - frame["start_datetime"]) / 2
    lat, lon = (bounds["miny"] + bounds["maxy"]) / 2, (bounds["minx"] + bounds["maxx"]) / 2
    return np.column_stack([lat, lon, middle.dt.dayofyear]).astype(np.float32)


def embed(
    spec: EmbedSpec,
    *,
    client: ClientLike,
    say: Callable[[str], None] = print,
    progress: Callable[[int, int], None] | None = None,
) -> EmbedSummary:
    """Encode the chips of an eoprep output into a feature store, appending only chips it lacks.

    Parameters
    ----------
    spec : EmbedSpec
        Input chips, encoder, runtime and output store.
    client : distributed.Client or a function returning one
        Where the encoder tasks run (workers with a ``GPU`` resource get them on CUDA); a function
        (a cluster still starting) is called once the input and the encoder have been checked.
    say : callable, optional
        Receives one-line messages.
    progress : callable, optional
        Called with (chips done, chips to do).

    Returns
    -------
    EmbedSummary
        Counts, model and timing of the run.

    Raises
    ------
    EoprepError
        When the input is not an eoprep output, a band is missing, or the store holds another model.
    """
    started = time.perf_counter()
    url = str(Path(spec.input.path) / CHIPS_STORE)
    try:
        ds = xr.open_zarr(url, group=spec.input.group, zarr_format=3, chunks=None).drop_vars("pixels")
        pixels = zarr.open_array(url, path=f"{spec.input.group}/pixels", mode="r")
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError, zarr.errors.ArrayNotFoundError):
        raise EoprepError(
            f"input: no chip group {spec.input.group!r} in {url}; give input.path of an `eoprep run` output "
            "and one of its collection names as input.group"
        ) from None
    ds = ds.load()
    ds.attrs["group"] = spec.input.group
    available = [str(b) for b in ds["band"].values]
    mask = spec.input.mask
    input_bands = spec.input.bands or [b for b in available if mask is None or b != mask.band]
    missing = [b for b in [*input_bands, *([mask.band] if mask else [])] if b not in available]
    if missing:
        raise EoprepError(f"input.bands: {missing} are not bands of group {spec.input.group!r} (it has {available})")
    info = build_encoder(spec.encoder.name, spec.encoder.params, input_bands, spec.encoder.checkpoint).info
    sources = map_bands(info.bands, input_bands, spec.encoder.band_map)
    decoder = {
        "band_index": [available.index(b) for b in sources],
        "scale": [float(ds["scale"].values[available.index(b)]) for b in sources],
        "offset": [float(ds["offset"].values[available.index(b)]) for b in sources],
        "nodata": float(pixels.attrs.get("nodata", pixels.fill_value)),
        "mean": list(info.mean),
        "std": list(info.std),
        "mask_index": available.index(mask.band) if mask else None,
        "mask_invalid": list(mask.invalid) if mask else [],
        "reduce": spec.input.time_reduce,
        "frames": info.frames,
        "size": info.size,
        "unsigned_bits": pixels.dtype.itemsize * 8,
    }
    dask, waited = resolve_client(client)
    started += waited  # a cluster still starting is not the run's time
    device, resources, note, n_workers = _resolve_device(dask, spec.runtime.device)
    store = FeatureStore(spec.output.path)
    record = {
        "name": spec.name,
        "model": info.name,
        "model_version": info.version,
        "weights": info.weights,
        "dimension": info.dim,
        "bands": list(info.bands),
        "band_sources": dict(zip(info.bands, sources, strict=True)),
        "normalisation": {"mean": list(info.mean), "std": list(info.std), "units": "physical (scale/offset applied)"},
        "resolution": info.resolution,
        "input_size": info.size,
        "frames": info.frames,
        "time_reduce": spec.input.time_reduce,
        "mask": mask.model_dump() if mask else None,
        "dtype": spec.output.dtype,
        "spec_hash": spec.spec_hash(),
        "input": {"path": spec.input.path, "group": spec.input.group},
        "eoprep_version": __version__,
    }
    summary = EmbedSummary(
        store=str(store.path),
        model=info.name,
        model_version=info.version,
        dimension=info.dim,
        device=device,
        notes=[note],
    )
    frame = _chip_frame(ds, str(pixels.attrs.get("collection", spec.input.group)))
    frame["model"], frame["model_version"], frame["spec_hash"] = info.name, info.version, record["spec_hash"]
    present = set(store.ids())
    written = ds["written"].values.astype(bool)
    todo = [i for i, cid in enumerate(frame["id"]) if written[i] and cid not in present]
    summary.chips_present = int(sum(cid in present for cid in frame["id"]))
    summary.chips_skipped = int((~written).sum())
    if store.exists():
        store.check_compatible(record)
    if not todo:
        say(f"all {summary.chips_present} written chips are already in {store.path}; nothing to encode")
        summary.rows = len(present)
        summary.seconds = time.perf_counter() - started
        return summary
    say(f"{len(todo)} chips to encode with {info.name} {info.version} ({info.dim}-d) on {note}")
    meta = _chip_meta(frame)
    # Tasks of at most chips_per_task chips, and at least one per worker that can run them. A GPU task
    # pays its reader start-up and its result's trip once, so ``auto`` makes them big there (16,384
    # chips on an H200: 3.9-4.3k chips/s with tasks of 4096 and 16 reader threads, 3.2k with 1024 and
    # 8); on CPUs tasks of 512 keep the progress moving.
    limit = spec.runtime.chips_per_task
    limit = (4096 if device == "cuda" else 512) if limit == "auto" else limit
    per_task = max(1, min(limit, -(-len(todo) // max(n_workers, 1))))
    tasks = [
        EncodeTask(
            store_url=url,
            group=spec.input.group,
            positions=tuple(todo[i : i + per_task]),
            meta=tuple(map(tuple, meta[todo[i : i + per_task]].tolist())),
            encoder=spec.encoder.name,
            params=dict(spec.encoder.params),
            checkpoint=spec.encoder.checkpoint,
            input_bands=tuple(input_bands),
            decoder=decoder,
            device=device,
            batch_size=spec.runtime.batch_size,
            precision=spec.runtime.precision,
            read_threads=spec.runtime.read_threads,
        )
        for i in range(0, len(todo), per_task)
    ]
    futures = {dask.submit(encode_chips, t, pure=False, resources=resources, retries=1): t for t in tasks}
    vectors: dict[int, np.ndarray] = {}
    if progress:
        progress(0, len(todo))
    for future in as_completed(futures):
        task = futures[future]
        for pos, vec in zip(task.positions, future.result(), strict=True):
            vectors[pos] = vec
        if progress:
            progress(len(vectors), len(todo))
    rows = frame.iloc[todo].reset_index(drop=True)
    stacked = np.stack([vectors[p] for p in todo])
    summary.rows = store.append(rows, stacked, record, dtype=spec.output.dtype, ann_threshold=spec.output.ann_threshold)
    summary.chips_encoded = len(todo)
    summary.seconds = time.perf_counter() - started
    return summary
