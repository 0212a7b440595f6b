"""TACO shards: the chips of the Zarr store re-packed as ``.tacozip`` files that tacoreader opens.

Layout (TACO 2, written by tacotoolbox, read by tacoreader)::

    OUT/taco/chips-<run>[_partNNNN].tacozip   one or more shards per run, each below ``split_size``
    OUT/taco/.tacocat/                        consolidated metadata of every shard (level0/level1 parquet)

Level 0 holds one FOLDER sample per chip (id = chip id), level 1 one FILE sample per collection
(id = group key, e.g. ``s2``) whose payload is a GeoTIFF of the chip: ``time × band`` image bands in
``(time, band)`` order, the raw stored values (uint16 with nodata, float32 with NaN), zstd-compressed.
Both levels carry the ``stac`` sample extension (crs, tensor shape, geotransform, time start/end,
centroid); the ``eoprep:*`` fields add what a training reader needs without opening the Zarr store.

The Zarr store stays the source of truth: TACO shards are derived from it after each run, only for
chips that are written there and not yet in a shard, and each shard is moved into place complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from eoprep import __version__
from eoprep.sinks._zarr import consecutive_runs

__all__ = ["TACO_DIR", "TACO_PAYLOAD_CODEC", "TacoWriteResult", "write_taco"]

TACO_DIR = "taco"
TACO_PAYLOAD_CODEC = "GTiff/ZSTD"
_TACOCAT = ".tacocat"
_CHIPS_PER_READ = 32
#: Level-0 field with a digest of the slot signatures a chip was packed from (the Zarr ``inputs`` of every group).
_INPUTS = "eoprep:inputs"


@dataclass(frozen=True)
class TacoWriteResult:
    """What one call of `write_taco` added, and how many stale shards it replaced."""

    shards: tuple[Path, ...]
    chips: int
    replaced: int = 0


def _packed(taco_dir: Path) -> dict[Path, dict[str, str | None] | None]:
    """Per ``.tacozip`` shard of a folder: its chip ids and the inputs each was packed from (from level 0;
    None in shards written before eoprep recorded them). A shard that does not read (truncated, not a
    zip) is None: it is replaced, and the store's chips it held are packed again."""
    packed: dict[Path, dict[str, str | None] | None] = {}
    for shard in sorted(taco_dir.glob("*.tacozip")):
        try:
            with zipfile.ZipFile(shard) as zf:
                level0 = pq.read_table(io.BytesIO(zf.read("METADATA/level0.parquet")))
        except (OSError, KeyError, zipfile.BadZipFile, pa.ArrowException):
            packed[shard] = None
            continue
        ids = [str(v) for v in level0.column("id").to_pylist()]
        digests = level0.column(_INPUTS).to_pylist() if _INPUTS in level0.column_names else [None] * len(ids)
        packed[shard] = dict(zip(ids, digests, strict=True))
    return packed


def write_taco(
    out_dir: Path,
    store_url: str,
    *,
    name: str,
    split_size: str,
    run_id: str,
) -> TacoWriteResult:
    """Pack the written chips of the Zarr store that no shard holds as they are now into new ``.tacozip`` shards.

    A shard holding a chip the store has since rewritten (new scenes in a whole-series chip, a
    re-processed scene) or no longer counts as written is replaced: its other chips are packed again
    with the new ones, then the old shard is deleted. Shards are never modified in place.

    Parameters
    ----------
    out_dir
        The output directory; shards go to ``out_dir / "taco"``.
    store_url
        The run's Zarr store (``chips.zarr``), the source of every pixel and coordinate.
    name
        Pipeline name, used as the TACO dataset id.
    split_size
        Target size of one shard, e.g. ``"512MB"`` (tacotoolbox ``split_size``).
    run_id
        Names this run's shards, so shards of earlier runs are never rewritten.

    Returns
    -------
    TacoWriteResult
        The new shard paths, how many chips they hold, and how many old shards they replaced.
    """
    import tacotoolbox
    from tacotoolbox.datamodel import Sample, Taco, Tortilla
    from tacotoolbox.taco.datamodel import Provider

    taco_dir = out_dir / TACO_DIR
    taco_dir.mkdir(parents=True, exist_ok=True)
    root = zarr.open_group(store_url, mode="r", zarr_format=3)
    keys = sorted(root.group_keys())
    first = root[keys[0]]
    ids = [str(v) for v in first["chip"][:]]
    written = np.logical_and.reduce([root[f"{k}/written"][:] for k in keys])
    inputs = {k: [str(v) for v in root[f"{k}/inputs"][:]] for k in keys}
    current = {ids[i]: _inputs_digest([inputs[k][i] for k in keys]) for i in range(len(ids)) if written[i]}
    packed = _packed(taco_dir)
    stale = [s for s, chips in packed.items() if chips is None or any(current.get(c) != d for c, d in chips.items())]
    kept = {c for shard, chips in packed.items() if chips is not None and shard not in stale for c in chips}
    todo = [i for i, cid in enumerate(ids) if cid in current and cid not in kept]
    if not todo:
        _replace(stale, [], taco_dir)
        return TacoWriteResult(shards=(), chips=0, replaced=len(stale))

    staging = Path(tempfile.mkdtemp(prefix=f".partial-{run_id}-", dir=taco_dir))
    try:
        samples = []
        built = _chip_samples(root, keys, todo, current, staging, Sample)
        for i, (children, stac, meta) in zip(todo, built, strict=True):
            sample = Sample(id=ids[i], path=Tortilla(samples=children))
            sample.extend_with(stac)
            sample.extend_with(meta)
            samples.append(sample)
        taco = Taco(
            tortilla=Tortilla(samples=samples),
            id=_dataset_id(name),
            dataset_version=__version__,
            description=f"eoprep chips of pipeline {name!r}: one folder per chip, one GeoTIFF per collection "
            "(bands ordered time-major, raw stored values).",
            licenses=["other"],
            providers=[Provider(name="eoprep", roles=["processor"])],
            tasks=["other"],
            title=f"eoprep chips: {name}",
        )
        with _quiet_tacotoolbox():
            made = tacotoolbox.create(
                taco, staging / f"chips-{run_id}.tacozip", split_size=split_size, consolidate=False, temp_dir=staging
            )
        moved = _replace(stale, made, taco_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return TacoWriteResult(shards=tuple(moved), chips=len(todo), replaced=len(stale))


def _replace(stale: Sequence[Path], made: Sequence[Path], taco_dir: Path) -> list[Path]:
    """Move the new shards in, then delete the shards they replace, then swap the consolidated metadata:
    a run killed in between leaves a chip in two shards, and the next run replaces the stale one."""
    moved = []
    for path in made:
        target = taco_dir / path.name
        os.replace(path, target)
        moved.append(target)
    for shard in stale:
        shard.unlink(missing_ok=True)
    _consolidate(taco_dir)
    return moved


def _inputs_digest(signatures: Sequence[str]) -> str:
    """What a chip was built from, over all its groups (their stored slot signatures)."""
    return hashlib.sha1("\x1f".join(signatures).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _quiet_tacotoolbox() -> Iterator[None]:
    """No progress bars or info logs from tacotoolbox while it runs inside a pipeline (levels restored after)."""
    loggers = [logging.getLogger(n) for n in ("tacotoolbox", "tacotoolbox._progress")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _chip_samples(
    root: zarr.Group,
    keys: Sequence[str],
    todo: Sequence[int],
    digests: dict[str, str],
    staging: Path,
    sample_cls: Any,
) -> list[tuple[list[Any], Any, dict[str, Any]]]:
    """Level-1 samples (one GeoTIFF per collection) and level-0 metadata of each chip to pack
    (``digests``: each chip's `_inputs_digest`, by id)."""
    from tacotoolbox.sample.extensions.stac import STAC

    coords = {k: _coords(root[k]) for k in keys}
    out: list[tuple[list[Any], Any, dict[str, Any]]] = []
    for lo in range(0, len(todo), _CHIPS_PER_READ):
        batch = todo[lo : lo + _CHIPS_PER_READ]
        pixels = {k: _chips_at(root[f"{k}/pixels"], batch) for k in keys}
        for j, i in enumerate(batch):
            c0 = coords[keys[0]]
            children = []
            for k in keys:
                c = coords[k]
                arr = pixels[k][j]
                times = c["datetime"][i]
                valid_times = times[~np.isnat(times)]
                t0 = _micros(valid_times.min()) if valid_times.size else _micros(c["window_start"][i])
                t1 = _micros(valid_times.max()) if valid_times.size else _micros(c["window_end"][i])
                payload = _geotiff(arr, c["crs"][i], c["transform"][i], c["nodata"], c["bands"], times)
                child = sample_cls(id=k, path=payload, temp_dir=staging)
                child.extend_with(
                    STAC(
                        sample_id=f"{c0['chip'][i]}/{k}",
                        crs=c["crs"][i],
                        tensor_shape=tuple(int(n) for n in arr.shape),
                        geotransform=tuple(float(v) for v in c["transform"][i]),
                        time_start=t0,
                        time_end=t1,
                    )
                )
                child.extend_with(
                    {
                        "eoprep:collection": k,
                        "eoprep:stac_collection": c["collection"],
                        "eoprep:dtype": str(arr.dtype),
                        "eoprep:nodata": json.dumps(c["nodata"]),
                        "eoprep:bands": json.dumps(c["bands"]),
                        "eoprep:scale": json.dumps(c["scale"]),
                        "eoprep:offset": json.dumps(c["offset"]),
                        "eoprep:datetimes": json.dumps([_iso(t) for t in times]),
                        "eoprep:item_ids": c["item_ids"][i],
                        "eoprep:valid_fraction": float(c["valid_fraction"][i]),
                        "eoprep:cloud_fraction": float(c["cloud_fraction"][i]),
                        "eoprep:codec": TACO_PAYLOAD_CODEC,
                        "eoprep:crc32": zlib.crc32(payload),
                    }
                )
                children.append(child)
            meta = {
                _INPUTS: digests[c0["chip"][i]],
                "eoprep:chip_id": c0["chip"][i],
                "eoprep:cell": c0["cell"][i],
                "eoprep:zarr_index": int(i),
                "eoprep:collections": json.dumps(list(keys)),
                "eoprep:footprint": c0["footprint"][i],
            }
            stac = STAC(
                sample_id=c0["chip"][i],
                crs=c0["crs"][i],
                tensor_shape=tuple(int(n) for n in pixels[keys[0]][j].shape[-2:]),
                geotransform=tuple(float(v) for v in c0["transform"][i]),
                time_start=_micros(c0["window_start"][i]),
                time_end=_micros(c0["window_end"][i]),
            )
            out.append((children, stac, meta))
    return out


def _chips_at(pixels: zarr.Array, positions: Sequence[int]) -> list[np.ndarray]:
    """The chips at ``positions``, each run of consecutive ones read as one slice (`consecutive_runs`)."""
    chips: list[np.ndarray] = []
    for run in consecutive_runs(positions):
        chips.extend(pixels[run.start : run.stop])
    return chips


def _coords(group: zarr.Group) -> dict[str, Any]:
    def texts(name: str) -> list[str]:
        return [str(v) for v in group[name][:]]

    pixels = group["pixels"]
    return {
        "chip": texts("chip"),
        "cell": texts("cell"),
        "crs": texts("crs"),
        "footprint": texts("footprint"),
        "item_ids": texts("item_ids"),
        "transform": group["transform"][:],
        "datetime": _times(group["datetime"]),
        "window_start": _times(group["window_start"]),
        "window_end": _times(group["window_end"]),
        "valid_fraction": group["valid_fraction"][:],
        "cloud_fraction": group["cloud_fraction"][:],
        "bands": texts("band"),
        "scale": [float(v) for v in group["scale"][:]],
        "offset": [float(v) for v in group["offset"][:]],
        "collection": str(pixels.attrs.get("collection", group.basename)),
        "nodata": _nodata(pixels),
    }


def _times(arr: zarr.Array) -> np.ndarray:
    """Stored CF times (microseconds since 1970, int64 with a NaT fill) as datetime64[us]."""
    raw = arr[:]
    if np.issubdtype(raw.dtype, np.datetime64):
        return raw.astype("datetime64[us]")
    units = arr.attrs.get("units", "microseconds since 1970-01-01")
    if not str(units).startswith("microseconds since 1970-01-01"):
        raise ValueError(f"{arr.path}: unexpected time units {units!r}")
    fill = arr.attrs.get("_FillValue", np.iinfo(np.int64).min)
    out = raw.astype("datetime64[us]")
    out[raw == fill] = np.datetime64("NaT")
    out[raw == np.iinfo(np.int64).min] = np.datetime64("NaT")
    return out


def _nodata(pixels: zarr.Array) -> float | int | None:
    value = pixels.fill_value
    if value is None:
        return None
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and np.isnan(value) else value


def _micros(t: np.datetime64) -> int:
    return int(np.datetime64(t, "us").astype(np.int64))


def _iso(t: np.datetime64) -> str | None:
    return None if np.isnat(t) else str(np.datetime64(t, "s"))


def _geotiff(
    arr: np.ndarray,
    crs: str,
    transform: np.ndarray,
    nodata: float | int | None,
    bands: Sequence[str],
    times: np.ndarray,
) -> bytes:
    """One chip of one collection as GeoTIFF bytes: ``time × band`` image bands, lossless zstd.

    Integers get the horizontal predictor. Floats get none: TIFF's floating-point predictor saves
    about 8 % of an S1 payload's bytes but makes it a third slower to decode, and decoding is what
    a training reader waits on. zstd level 3 (zstd's own default) rather than GDAL's 9: an S2 chip
    of 256² encodes in 34 ms instead of 107 ms for 4 % more bytes, and decodes as fast.
    """
    from affine import Affine
    from rasterio.io import MemoryFile

    n_time, n_band, height, width = arr.shape
    tiled = height % 16 == 0 and width % 16 == 0
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": n_time * n_band,
        "dtype": arr.dtype,
        "crs": crs,
        "transform": Affine.from_gdal(*transform),
        "nodata": np.nan if np.issubdtype(arr.dtype, np.floating) else nodata,
        "compress": "zstd",
        "zstd_level": 3,
        "predictor": 1 if np.issubdtype(arr.dtype, np.floating) else 2,
        "interleave": "band",
    }
    if tiled:
        profile.update(tiled=True, blockxsize=min(width, 256), blockysize=min(height, 256))
    with MemoryFile() as memfile:
        with memfile.open(**profile) as dst:
            dst.write(arr.reshape(n_time * n_band, height, width))
            for t in range(n_time):
                for b, band in enumerate(bands):
                    dst.set_band_description(t * n_band + b + 1, f"{band}@{_iso(times[t]) or 'padding'}")
        return bytes(memfile.getbuffer())


def _dataset_id(name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "_-" else "-" for c in name.lower())
    return safe or "eoprep"


def _consolidate(taco_dir: Path) -> None:
    """Rebuild ``.tacocat`` over every shard of the folder and swap it in whole."""
    from tacotoolbox import create_tacocat

    shards = sorted(taco_dir.glob("*.tacozip"))
    if not shards:
        return
    staging = Path(tempfile.mkdtemp(prefix=".tacocat-", dir=taco_dir))
    try:
        with _quiet_tacotoolbox():
            create_tacocat(inputs=shards, output=staging, validate_schema=True)
        target = taco_dir / _TACOCAT
        old = taco_dir / f".tacocat-old-{os.getpid()}"
        if target.exists():
            os.replace(target, old)
        os.replace(staging / _TACOCAT, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
