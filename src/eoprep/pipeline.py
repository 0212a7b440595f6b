"""The main job: spec → search → chip plan → one Dask task per shard → Zarr + index + STAC + manifest."""

from __future__ import annotations

import datetime as dt
import platform
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client, as_completed

from eoprep import __version__
from eoprep.chips import (
    ChipPlan,
    ChipResult,
    CollectionLayout,
    build_chip,
    chip_quality,
    collection_layout,
    plan_chips,
)
from eoprep.config import PipelineSpec
from eoprep.errors import EoprepError
from eoprep.grid import GlobalGrid
from eoprep.sinks import CHIPS_STORE, ChipStore, ShardSlice, write_index, write_manifest, write_stac
from eoprep.sources import aoi_geometry, search_items

__all__ = ["ChipFailed", "RunSummary", "process_shard", "run_pipeline"]


class ChipFailed(EoprepError):
    """A chip whose reads kept failing under ``loader.on_error: fail``."""


@dataclass
class RunSummary:
    """What a run did; printed by the CLI and stored in the run manifest."""

    run_id: str
    output: str
    chips_planned: int = 0
    chips_written: int = 0
    chips_present: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    bytes_written: int = 0
    seconds: float = 0.0
    items: dict[str, int] = field(default_factory=dict)

    @property
    def mb_per_s(self) -> float:
        return self.bytes_written / 1e6 / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _LoaderOptions:
    engine: str
    retries: int
    backoff: float
    on_error: str
    composite: bool


def process_shard(
    store_url: str, layouts: dict[str, CollectionLayout], shard: ShardSlice, options: _LoaderOptions
) -> list[ChipResult]:
    """Worker task: build the chips of one shard for every collection and write the shard once.

    A chip whose reads fail after the retries is skipped (left as nodata, ``written`` false) or,
    under ``on_error: fail``, aborts the task before anything of its shard is written.
    """
    import rasterio

    store = ChipStore(store_url)
    results: list[ChipResult] = []
    blocks: dict[str, list[np.ndarray]] = {key: [] for key in layouts}
    with rasterio.Env():
        for plan in shard.plans:
            result, arrays = _build_all(plan, layouts, options)
            results.append(result)
            for key in layouts:
                blocks[key].append(arrays[key])
    for key, arrays in blocks.items():
        store.write_slice(key, shard.start, np.stack(arrays))
    return results


def _build_all(
    plan: ChipPlan, layouts: dict[str, CollectionLayout], options: _LoaderOptions
) -> tuple[ChipResult, dict[str, np.ndarray]]:
    arrays: dict[str, np.ndarray] = {}
    result = ChipResult(plan.id, written=True, attempts=0)
    try:
        for key, layout in layouts.items():
            chip, attempts = build_chip(
                plan,
                layout,
                engine=options.engine,
                retries=options.retries,
                backoff=options.backoff,
                composite=options.composite,
            )
            arrays[key] = chip
            result.attempts += attempts
            result.valid_fraction[key], result.cloud_fraction[key] = chip_quality(chip, layout)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {_first_line(exc)}"
        if options.on_error == "fail":
            raise ChipFailed(f"chip {plan.id}: reads failed after {options.retries} retries: {reason}") from None
        result = ChipResult(plan.id, written=False, reason=reason, attempts=result.attempts)
        arrays = {key: _empty(plan, layout) for key, layout in layouts.items()}
    return result, arrays


def _empty(plan: ChipPlan, layout: CollectionLayout) -> np.ndarray:
    shape = (layout.n_time, len(layout.bands), plan.grid.size, plan.grid.size)
    return np.full(shape, layout.nodata, dtype=layout.dtype)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def run_pipeline(
    spec: PipelineSpec,
    *,
    client: Client,
    catalog_url: str | None = None,
    say: Callable[[str], None] = print,
    progress: Callable[[int, int], None] | None = None,
) -> RunSummary:
    """Run a spec on a Dask client and return the summary.

    Everything that can be wrong with the input (spec, AOI, API, search, bands, an incompatible
    existing output) is checked before the first byte is written.
    """
    started = time.perf_counter()
    run_id = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    out_dir = Path(spec.output.path)
    store = ChipStore(str(out_dir / CHIPS_STORE))
    summary = RunSummary(run_id=run_id, output=str(out_dir))

    grid = GlobalGrid(cell_size=spec.grid.cell_size, pixel_size=spec.grid.pixel_size)
    aoi = aoi_geometry(spec.source.aoi)
    cells = grid.cells_in_geometry(aoi)
    say(f"AOI covers {len(cells)} grid cells of {spec.grid.cell_size:g} m; searching {catalog_url or spec.source.url}")
    items = search_items(spec.source, url=catalog_url, aoi=aoi)
    summary.items = {key: len(v) for key, v in items.items()}
    layouts = {c.key: collection_layout(spec, c, items[c.key]) for c in spec.source.collections}
    plans, notes = plan_chips(spec, grid, cells, items, layouts)
    summary.notes = notes
    summary.chips_planned = len(plans)
    if not plans:
        raise EoprepError(f"source: no chip of the AOI has items in {spec.source.datetime}; nothing to write")
    if store.exists():
        store.check_compatible(spec, layouts)
    present = set(store.chip_ids(next(iter(layouts)))) if store.exists() else set()
    todo = [p for p in plans if p.id not in present]
    summary.chips_present = len(plans) - len(todo)
    bytes_before = store.bytes_stored()
    if todo:
        say(
            f"{len(todo)} chips to write ({summary.chips_present} already in {out_dir}), "
            f"{sum(summary.items.values())} items from {len(items)} collection(s)"
        )
        slices = store.allocate(spec, layouts, todo, _zarr_codecs(spec, layouts))
        results = _execute(client, store, layouts, slices, spec, progress)
        positions = {cid: i for i, cid in enumerate(store.chip_ids(next(iter(layouts))))}
        store.record(layouts, positions, results)
        summary.chips_written = sum(r.written for r in results)
        summary.skipped = [(r.id, r.reason or "") for r in results if not r.written]
        store.consolidate()
    else:
        say(f"all {len(plans)} chips are already in {out_dir}; nothing to write")
    summary.bytes_written = store.bytes_stored() - bytes_before
    table = write_index(out_dir, store.url)
    write_stac(out_dir, table, name=spec.name, spec_hash=spec.spec_hash())
    summary.seconds = time.perf_counter() - started
    write_manifest(out_dir, run_id, _manifest(spec, summary, items))
    return summary


def _zarr_codecs(spec: PipelineSpec, layouts: dict[str, CollectionLayout]) -> dict[str, dict[str, Any]] | None:
    if spec.output.codec is None:
        return None
    from eoprep.codecs import CodecSpec, zarr_codecs

    codec = CodecSpec.model_validate(spec.output.codec)
    return {key: zarr_codecs(codec, np.dtype(layout.dtype)) for key, layout in layouts.items()}


def _execute(
    client: Client,
    store: ChipStore,
    layouts: dict[str, CollectionLayout],
    slices: Sequence[ShardSlice],
    spec: PipelineSpec,
    progress: Callable[[int, int], None] | None,
) -> list[ChipResult]:
    options = _LoaderOptions(
        engine=spec.loader.engine,
        retries=spec.loader.retries,
        backoff=spec.loader.backoff,
        on_error=spec.loader.on_error,
        composite=spec.time.mode == "composite",
    )
    total = sum(len(s.plans) for s in slices)
    futures = [
        client.submit(
            process_shard, store.url, layouts, s, options, key=f"eoprep-shard-{s.start}-{id(s)}", pure=False, retries=1
        )
        for s in slices
    ]
    results: list[ChipResult] = []
    done = 0
    if progress:
        progress(0, total)
    try:
        for future in as_completed(futures):
            try:
                shard_results = future.result()
            except ChipFailed:
                for other in futures:
                    other.cancel()
                raise
            except Exception as exc:
                if spec.loader.on_error == "fail":
                    raise EoprepError(f"a shard task failed: {type(exc).__name__}: {_first_line(exc)}") from None
                shard = slices[futures.index(future)]
                reason = f"task failed: {type(exc).__name__}: {_first_line(exc)}"
                shard_results = [ChipResult(p.id, written=False, reason=reason) for p in shard.plans]
            results.extend(shard_results)
            done += len(shard_results)
            if progress:
                progress(done, total)
    finally:
        if len(results) < total:
            positions = {cid: i for i, cid in enumerate(store.chip_ids(next(iter(layouts))))}
            store.record(layouts, positions, results)
    return results


def _manifest(spec: PipelineSpec, summary: RunSummary, items: dict[str, list[Any]]) -> dict[str, Any]:
    from importlib.metadata import version

    deps = {}
    for name in ("dask", "distributed", "xarray", "zarr", "odc-stac", "stackstac", "rasterio", "pystac-client"):
        try:
            deps[name] = version(name)
        except Exception:
            deps[name] = None
    return {
        "run_id": summary.run_id,
        "eoprep_version": __version__,
        "python": platform.python_version(),
        "dependencies": deps,
        "spec": spec.model_dump(mode="json"),
        "spec_hash": spec.spec_hash(),
        "input_items": {key: [it.id for it in its] for key, its in items.items()},
        "summary": summary.to_dict(),
    }


def format_traceback(exc: BaseException) -> str:
    """Full traceback text, for ``--debug``."""
    return "".join(traceback.format_exception(exc))
