"""The embed job: chips of an eoprep output → encoder tasks on Dask workers → feature store.

Each task takes a run of chip positions, reads their raw integers from Zarr in reader threads
(decompression overlaps compute), pins them and copies them on a side CUDA stream while the
previous batch is encoded; decoding (scale, mask, composite, normalise, resize) happens on the
device. Models are built once per worker process and reused by later tasks.
"""

from __future__ import annotations

import json
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
    read_threads: int


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
        _MODELS[key] = (model, decoder, device)
    return _MODELS[key]


def _host_tensor(values: np.ndarray) -> tuple[torch.Tensor, int]:
    """Raw chip values as a tensor torch can copy: unsigned integers are viewed as signed of the same width."""
    signed = {np.dtype(np.uint16): np.int16, np.dtype(np.uint32): np.int32, np.dtype(np.uint64): np.int64}
    bits = values.dtype.itemsize * 8
    if values.dtype in signed:
        values = values.view(signed[values.dtype])
    return torch.from_numpy(np.ascontiguousarray(values)), bits


def _batches(task: EncodeTask, batch_size: int, pin: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """Host batches (raw, meta, count) read ahead by a thread pool, pinned for asynchronous copies."""
    arr = zarr.open_array(task.store_url, path=f"{task.group}/pixels", mode="r")
    positions = list(task.positions)
    meta = np.asarray(task.meta, dtype=np.float32).reshape(-1, 3)
    chunks = [(positions[i : i + batch_size], meta[i : i + batch_size]) for i in range(0, len(positions), batch_size)]

    def read(chunk: tuple[list[int], np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, int]:
        pos, m = chunk
        values = np.concatenate([arr[run.start : run.stop] for run in consecutive_runs(pos)])
        raw, _ = _host_tensor(values)
        meta_t = torch.from_numpy(m)
        if pin:
            raw, meta_t = raw.pin_memory(), meta_t.pin_memory()
        return raw, meta_t, len(pos)

    with ThreadPoolExecutor(task.read_threads) as pool:
        ahead = deque(pool.submit(read, c) for c in chunks[: task.read_threads + 1])
        queued = len(ahead)
        while ahead:
            batch = ahead.popleft().result()
            if queued < len(chunks):
                ahead.append(pool.submit(read, chunks[queued]))
                queued += 1
            yield batch


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
    """Chips per batch: 32 on CPU; on CUDA, what half the free memory holds, measured on two chips.

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
        A power of two between 1 and 1024.
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
    return int(2 ** np.clip(np.floor(np.log2(max(fits, 1))), 0, 10))


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
        arr = zarr.open_array(task.store_url, path=f"{task.group}/pixels", mode="r")
        sample, _ = _host_tensor(arr[task.positions[0] : task.positions[0] + 1])
        batch_size = auto_batch_size(model, decoder, sample, device, task.precision)
    out: list[torch.Tensor] = []
    with torch.inference_mode(), _autocast(device, task.precision):
        for raw, meta, _ in _on_device(_batches(task, int(batch_size), device.type == "cuda"), device):
            out.append(model(decoder(raw), meta).float().to("cpu", non_blocking=device.type == "cuda"))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return torch.cat(out).numpy()


def _resolve_device(client: Client, wanted: str) -> tuple[str, dict[str, float] | None, str]:
    """Device of the tasks, their Dask resources and a note for the user.

    Workers that declare a ``GPU`` resource get the tasks with ``resources={"GPU": 1}``; without
    such workers the tasks go to any worker, on CUDA only if the workers see a GPU.
    """
    workers = client.scheduler_info()["workers"].values()
    declared = any(w.get("resources", {}).get("GPU", 0) > 0 for w in workers)
    if wanted == "cpu":
        return "cpu", None, "device cpu"
    if declared:
        return "cuda", {"GPU": 1}, "device cuda on workers with the GPU resource"
    seen = any(client.run(torch.cuda.is_available).values())
    if seen:
        return "cuda", None, "device cuda (workers see a GPU but declare no GPU resource; tasks go to any worker)"
    if wanted == "cuda":
        raise EoprepError(
            "runtime.device: cuda, but no Dask worker declares a GPU resource or sees a CUDA device; "
            "start workers with `dask worker ADDRESS --resources GPU=1` on a GPU machine, or set device: cpu"
        )
    return "cpu", None, "device cpu (no worker has a GPU)"


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
        ds = xr.open_zarr(url, group=spec.input.group, zarr_format=3).drop_vars("pixels")
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
    model = build_encoder(spec.encoder.name, spec.encoder.params, input_bands, spec.encoder.checkpoint)
    info = model.info
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
    device, resources, note = _resolve_device(dask, spec.runtime.device)
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
    per_task = spec.runtime.chips_per_task
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
