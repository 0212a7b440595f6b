"""The main job: spec → search → chip plan → one Dask task per shard → Zarr + index + STAC + manifest."""

from __future__ import annotations

import datetime as dt
import functools
import platform
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np
from distributed import Client, as_completed

from eoprep import __version__
from eoprep.chips import (
    ChipPlan,
    ChipResult,
    CollectionLayout,
    RowChip,
    build_chip,
    chip_quality,
    collection_layout,
    empty_chip,
    item_fingerprint,
    plan_chips,
    quality_verdict,
    read_chip_rows,
)
from eoprep.config import PipelineSpec
from eoprep.errors import EoprepError
from eoprep.grid import GlobalGrid
from eoprep.ops import OutputLock
from eoprep.runtime import ClientLike, resolve_client
from eoprep.sinks import (
    CHIPS_STORE,
    INDEX_FILE,
    ChipState,
    ChipStore,
    ShardSlice,
    shard_slices,
    write_index,
    write_manifest,
    write_stac,
    write_taco,
)
from eoprep.sources import aoi_geometry, search_earthengine, search_items

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
    chips_updated: int = 0
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
    #: Read side-by-side chips row by row (scene chips from STAC sources).
    row_reads: bool
    #: Write whole shards of a local store with O_DIRECT (``output.direct_io``).
    direct_io: bool = False


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
    writers = {key: store.shard_writer(key, shard.positions, direct_io=options.direct_io) for key in layouts}
    stored = {
        plan.id: {key: store.read_chip(key, position) for key in layouts if plan.reuse.get(key)}
        for position, plan in zip(shard.positions, shard.plans, strict=True)
    }
    buffers: dict[str, np.ndarray] = {}
    with rasterio.Env():
        rows = _read_rows(shard.plans, layouts, options, stored)
        for position, plan in zip(shard.positions, shard.plans, strict=True):
            read = {key: rows[key][plan.id].build(buffers.get(key)) for key in layouts if plan.id in rows[key]}
            buffers.update(read)  # each writer encodes its chip at once: the next chip reuses the buffer
            result, arrays = _build_all(plan, layouts, options, stored[plan.id], read)
            results.append(result)
            for key, writer in writers.items():
                writer.add(position, arrays[key])
    results[0].bytes_written = sum(writer.close() for writer in writers.values())
    return results


def _read_rows(
    plans: Sequence[ChipPlan],
    layouts: dict[str, CollectionLayout],
    options: _LoaderOptions,
    stored: dict[str, dict[str, np.ndarray]],
) -> dict[str, dict[str, RowChip]]:
    """Side-by-side chips of the shard read row by row, where nothing asks for one chip at a time."""
    if not options.row_reads:
        return {key: {} for key in layouts}
    return {
        key: read_chip_rows(
            plans,
            layout,
            engine=options.engine,
            stored={chip: arrays[key] for chip, arrays in stored.items() if key in arrays},
        )
        for key, layout in layouts.items()
    }


def _build_all(
    plan: ChipPlan,
    layouts: dict[str, CollectionLayout],
    options: _LoaderOptions,
    stored: dict[str, np.ndarray],
    read: dict[str, np.ndarray],
) -> tuple[ChipResult, dict[str, np.ndarray]]:
    """Every collection of one chip (``read``: collections already read with their row), co-registered and rated."""
    arrays: dict[str, np.ndarray] = {}
    result = ChipResult(plan.id, written=True, attempts=0)
    try:
        for key, layout in layouts.items():
            if key in read:
                arrays[key] = read[key]
                result.attempts += 1
                continue
            chip, attempts = build_chip(
                plan,
                layout,
                engine=options.engine,
                retries=options.retries,
                backoff=options.backoff,
                composite=options.composite,
                stored=stored.get(key),
            )
            arrays[key] = chip
            result.attempts += attempts
        # Co-registration needs every collection of the chip; quality is measured on what gets written.
        from eoprep.align import coregister_chip

        arrays, shifts = coregister_chip(arrays, layouts)
        px = plan.grid.pixel_size
        for key, layout in layouts.items():
            result.valid_fraction[key], result.cloud_fraction[key] = chip_quality(arrays[key], layout)
            result.shifts[key] = [
                None if s is None else (s.dx * px, s.dy * px, s.confidence, s.applied) for s in shifts.get(key, [])
            ]
        result.reason = quality_verdict(result.valid_fraction, result.cloud_fraction, layouts)
        if result.reason is not None:
            result.written = False
            arrays = {key: empty_chip(plan, layout) for key, layout in layouts.items()}
    except Exception as exc:
        reason = f"{type(exc).__name__}: {_first_line(exc)}"
        if options.on_error == "fail":
            raise ChipFailed(f"chip {plan.id}: reads failed after {options.retries} retries: {reason}") from None
        result = ChipResult(plan.id, written=False, reason=reason, attempts=result.attempts)
        arrays = {key: empty_chip(plan, layout) for key, layout in layouts.items()}
    return result, arrays


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def run_pipeline(
    spec: PipelineSpec,
    *,
    client: ClientLike,
    catalog_url: str | None = None,
    say: Callable[[str], None] = print,
    progress: Callable[[int, int], None] | None = None,
    wait: bool = False,
) -> RunSummary:
    """Bring the output of a spec up to date on a Dask client and return the summary.

    New chips are appended, chips whose inputs changed (new scenes, re-processed items) or that an
    interrupted run left unfinished are rewritten, everything else is left alone. Everything that
    can be wrong with the input (spec, AOI, API, search, bands, an incompatible existing output) is
    checked before the first byte is written; one writer per output is enforced by a lock
    (``wait`` waits for it instead of failing). ``client`` may be a function that returns the client
    (e.g. of a cluster still starting): it is called once the spec is searched and planned.
    """
    started = time.perf_counter()

    def cluster() -> Client:
        """The client; waiting for its cluster to start is not counted as the run's time."""
        nonlocal started
        ready, waited = resolve_client(client)
        started += waited
        return ready

    run_id = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    out_dir = Path(spec.output.path)
    store = ChipStore(str(out_dir / CHIPS_STORE))
    summary = RunSummary(run_id=run_id, output=str(out_dir))

    grid = GlobalGrid(cell_size=spec.grid.cell_size, pixel_size=spec.grid.pixel_size)
    aoi = aoi_geometry(spec.source.aoi)
    cells = grid.cells_in_geometry(aoi)
    say(f"AOI covers {len(cells)} grid cells of {spec.grid.cell_size:g} m; searching {catalog_url or spec.source.url}")
    if spec.source.kind == "earthengine":
        items = search_earthengine(spec.source, aoi=aoi, client=cluster())
    else:
        items = search_items(spec.source, url=catalog_url, aoi=aoi)
    summary.items = {key: len(v) for key, v in items.items()}
    layouts = {c.key: collection_layout(spec, c, items[c.key]) for c in spec.source.collections}
    plans, notes = plan_chips(spec, grid, cells, items, layouts)
    summary.notes = notes
    summary.chips_planned = len(plans)
    if not plans:
        raise EoprepError(f"source: no chip of the AOI has items in {spec.source.datetime}; nothing to write")
    dask = cluster()  # before the first byte is written: a cluster that cannot start leaves no output behind
    with OutputLock(out_dir, wait=wait) if "://" not in spec.output.path else nullcontext():
        if store.exists():
            store.check_compatible(spec, layouts)
        work, new = _triage(store, layouts, plans)
        summary.chips_updated = len(work)
        summary.chips_present = len(plans) - len(work) - len(new)
        if work or new:
            say(
                f"{len(new)} new and {len(work)} changed or unfinished chips to write "
                f"({summary.chips_present} up to date in {out_dir}), "
                f"{sum(summary.items.values())} items from {len(items)} collection(s)"
            )
            if work:
                store.reset(layouts, [pos for pos, _ in work], [plan for _, plan in work])
            positions = [pos for pos, _ in work] + (
                list(store.allocate(spec, layouts, new, _zarr_codecs(spec, layouts))) if new else []
            )
            todo = [plan for _, plan in work] + new
            slices = shard_slices(positions, todo, spec.output.chips_per_shard)
            results = _execute(dask, store, layouts, slices, spec, progress)
            summary.chips_written = sum(r.written for r in results)
            summary.bytes_written = sum(r.bytes_written for r in results)
            summary.skipped = [(r.id, r.reason or "") for r in results if not r.written]
            store.consolidate()
        else:
            say(f"nothing new: all {len(plans)} chips in {out_dir} are up to date with their inputs")
        if work or new or not (out_dir / INDEX_FILE).exists():
            table = write_index(out_dir, store.url)
            if spec.output.format == "taco":
                packed = write_taco(
                    out_dir, store.url, name=spec.name, split_size=spec.output.taco_shard_size, run_id=run_id
                )
                if packed.replaced:
                    say(f"taco: replaced {packed.replaced} shard(s) that held rewritten chips or did not read")
            write_stac(out_dir, table, name=spec.name, spec_hash=spec.spec_hash())
        summary.seconds = time.perf_counter() - started
        write_manifest(out_dir, run_id, _manifest(spec, summary, items, layouts))
    return summary


def _triage(
    store: ChipStore, layouts: dict[str, CollectionLayout], plans: Sequence[ChipPlan]
) -> tuple[list[tuple[int, ChipPlan]], list[ChipPlan]]:
    """Split planned chips into (position, plan) to rewrite and plans to append; up-to-date ones drop out.

    A stored chip is up to date when its slot signatures are unchanged and it was written, or it was
    rated and dropped by the quality rules, which still drop it: rereading it would only drop it
    again, and rewrite its shard. A chip never finished (reads failed, a run killed before it was
    rated) or whose signatures changed is rewritten; slots whose signatures form an unchanged prefix
    are reused rather than read again. Not under co-registration: stored slots are already corrected
    against that run's reference scene, and correcting them again would not give what a clean run writes.
    """
    reusable = all(layout.align is None for layout in layouts.values())
    states = {key: store.states(key) for key in layouts}
    first = next(iter(layouts))
    work: list[tuple[int, ChipPlan]] = []
    new: list[ChipPlan] = []
    for plan in plans:
        state = states[first].get(plan.id)
        if state is None:
            new.append(plan)
            continue
        old = {key: states[key][plan.id] for key in layouts}
        unchanged = all(old[key].inputs == plan.inputs.get(key, []) for key in layouts)
        if unchanged and (state.written or _still_dropped(old, layouts)):
            continue
        if state.written and reusable:
            plan.reuse = {key: _common_prefix(old[key].inputs, plan.inputs.get(key, [])) for key in layouts}
        work.append((state.position, plan))
    return work, new


def _still_dropped(states: dict[str, ChipState], layouts: dict[str, CollectionLayout]) -> bool:
    """Whether an unwritten chip was rated (every group has a valid fraction) and the quality rules drop it."""
    valid = {key: state.valid_fraction for key, state in states.items()}
    if any(np.isnan(v) for v in valid.values()):
        return False
    cloud = {key: state.cloud_fraction for key, state in states.items()}
    return quality_verdict(valid, cloud, layouts) is not None


def _common_prefix(a: Sequence[str], b: Sequence[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


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
        row_reads=spec.time.mode == "scenes" and spec.source.kind != "earthengine",
        direct_io=spec.output.direct_io,
    )
    total = sum(len(s.plans) for s in slices)
    homes = _home_workers(client, [len(s.plans) for s in slices])
    futures = [
        client.submit(
            process_shard,
            store.url,
            layouts,
            s,
            options,
            key=f"eoprep-shard-{s.positions[0]}-{uuid4().hex}",
            pure=False,
            retries=1,
            workers=home,
            allow_other_workers=home is not None,
        )
        for s, home in zip(slices, homes, strict=True)
    ]
    where = {plan.id: pos for s in slices for pos, plan in zip(s.positions, s.plans, strict=True)}
    results: list[ChipResult] = []
    pending: list[ChipResult] = []
    last_record = time.monotonic()
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
            pending.extend(shard_results)
            # Recorded every few seconds, not per shard (each record rewrites the per-chip columns):
            # a run killed now keeps what was recorded, the next run finishes the rest.
            if time.monotonic() - last_record >= _RECORD_EVERY_S:
                store.record(layouts, where, pending)
                pending, last_record = [], time.monotonic()
            if progress:
                progress(len(results), total)
    finally:
        if pending:
            store.record(layouts, where, pending)
    return results


_RECORD_EVERY_S = 2.0


def _home_workers(client: Client, sizes: Sequence[int]) -> list[list[str] | None]:
    """A preferred worker per shard (of ``sizes`` chips): runs of consecutive shards, about as many
    chips per worker.

    Neighbouring chips share the COG tiles along their edges; on one worker the second chip finds
    them decoded in GDAL's block cache. Dealt round-robin, every shard's neighbours went to other
    workers and each tile was decoded about twice. A preference only: idle workers still take work.
    """
    workers = sorted(client.ncores())
    total = sum(sizes)
    if len(workers) < 2 or not total:
        return [None] * len(sizes)
    homes, before = [], 0
    for size in sizes:
        homes.append([workers[min(int((before + size / 2) * len(workers) / total), len(workers) - 1)]])
        before += size
    return homes


@functools.cache
def _dependency_versions() -> dict[str, str | None]:
    """Versions of the packages a run depends on; looked up once per process (a scheduled refresh runs many)."""
    from importlib.metadata import version

    deps: dict[str, str | None] = {}
    for name in ("dask", "distributed", "xarray", "zarr", "odc-stac", "stackstac", "rasterio", "pystac-client"):
        try:
            deps[name] = version(name)
        except Exception:
            deps[name] = None
    return deps


def _manifest(
    spec: PipelineSpec, summary: RunSummary, items: dict[str, list[Any]], layouts: dict[str, CollectionLayout]
) -> dict[str, Any]:
    deps = dict(_dependency_versions())
    stamps = [
        str(it.properties.get("updated") or it.properties.get("datetime")) for its in items.values() for it in its
    ]
    return {
        "run_id": summary.run_id,
        "eoprep_version": __version__,
        "python": platform.python_version(),
        "dependencies": deps,
        "spec": spec.model_dump(mode="json"),
        "spec_hash": spec.spec_hash(),
        "watermark": max(stamps) if stamps else None,
        "input_items": {
            key: {it.id: item_fingerprint(it, layouts[key].bands) for it in its} for key, its in items.items()
        },
        "summary": summary.to_dict(),
    }
