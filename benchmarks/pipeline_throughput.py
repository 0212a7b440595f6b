"""End-to-end chip throughput against the raw-read bound, odc-stac vs stackstac, and peak worker memory.

All numbers come from one run on this machine:

* raw bound: rasterio reading exactly the windows the chips need (each band of each scene, onto the
  chip's pixel grid), in a process pool with the same number of processes as Dask workers, file
  handles cached per process, nothing written; the pool is started before the clock starts, as the
  Dask cluster is;
* eoprep: ``run_pipeline`` on a fresh LocalCluster (processes) against the real local pgstac API,
  search and planning included, Zarr shards written; one untimed run first pays this process's
  one-time costs (imports such as ``dask.array``, which xarray loads with its first Variable), as the
  bound's imports are paid before its clock starts, so the first timed row is not the only one to
  carry them;
* every timed row starts after ``os.sync()``, so no row runs under the writeback of an earlier row's output;
* memory: peak RSS of the workers during the run (VmHWM, reset once the workers have imported
  everything) next to their idle RSS, for a small AOI and one with 4.4x its chips;
* rounds: every row is measured ``--rounds`` times, the rows interleaved, and each eoprep run is
  divided by the raw bound of its own round; the table shows the median and the range. One round
  swings by 20-30 % on a shared VM, more than most changes worth measuring.

    .venv/bin/python benchmarks/pipeline_throughput.py [--workers 2] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import from_bounds

from eoprep.catalog_server import LocalStacServer, default_data_dir
from eoprep.config import parse_spec
from eoprep.demo import DEMO_DATETIME, S2_COLLECTION
from eoprep.embedded import demo_archive
from eoprep.grid import GlobalGrid
from eoprep.pipeline import run_pipeline
from eoprep.runtime import dask_client

BANDS = ["B02", "B03", "B04", "B08", "B11", "B12", "SCL"]
ARCHIVE_BBOX = (9.00, 45.40, 9.28, 45.60)
SMALL_AOI = [9.03, 45.42, 9.12, 45.50]
LARGE_AOI = [9.01, 45.41, 9.27, 45.59]
CELL, PIXEL = 2560.0, 10.0

_handles: dict[str, Any] = {}


def _read_chip(job: tuple[list[str], tuple[float, float, float, float], int]) -> int:
    """Read every band window of one chip (one file per band and scene), handles cached per process."""
    paths, bounds, size = job
    total = 0
    for path in paths:
        src = _handles.get(path)
        if src is None:
            src = _handles[path] = rasterio.open(path)
        data = src.read(1, window=from_bounds(*bounds, transform=src.transform), out_shape=(size, size))
        total += data.nbytes
    return total


def raw_bound(items: list[dict[str, Any]], bbox: list[float], workers: int) -> dict[str, float]:
    grid = GlobalGrid(cell_size=CELL, pixel_size=PIXEL)
    jobs = []
    for cell in grid.cells_in_bbox(tuple(bbox)):
        bounds = (cell.x0, cell.y0 - CELL, cell.x0 + CELL, cell.y0)
        paths = [it["assets"][b]["href"].removeprefix("file://") for it in items for b in BANDS]
        jobs.append((paths, bounds, cell.size))
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(time.sleep, [0.2] * workers))  # every process started, as the Dask workers are
        os.sync()  # no writeback of earlier rows' output running under this one
        start = time.perf_counter()
        nbytes = sum(pool.map(_read_chip, jobs))
        seconds = time.perf_counter() - start
    return {
        "chips": len(jobs),
        "seconds": seconds,
        "mb": nbytes / 1e6,
        "mb_s": nbytes / 1e6 / seconds,
        "chips_s": len(jobs) / seconds,
    }


def _peak_rss_mb() -> float:
    """Peak RSS since the last reset (Linux VmHWM), else since the process started."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> float:
    """Start the peak over from the current RSS, so import-time peaks do not hide the run's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _peak_rss_mb()


def eoprep_run(url: str, out: Path, bbox: list[float], engine: str, workers: int) -> dict[str, float]:
    spec = parse_spec(
        {
            "name": "bench",
            "source": {
                "url": url,
                "collections": [{"id": S2_COLLECTION, "name": "s2", "bands": BANDS}],
                "aoi": {"bbox": bbox},
                "datetime": DEMO_DATETIME,
            },
            "grid": {"cell_size": CELL, "pixel_size": PIXEL},
            "time": {"mode": "scenes", "max_scenes": 8},
            "loader": {"engine": engine},
            "output": {"path": str(out)},  # default codec and chips_per_shard (8)
        }
    )
    with dask_client(workers=workers, say=lambda _m: None) as client:
        idle = max(client.run(_reset_peak).values())
        os.sync()  # no writeback of earlier rows' output running under this one
        start = time.perf_counter()
        summary = run_pipeline(spec, client=client, say=lambda _m: None)
        seconds = time.perf_counter() - start
        peaks = client.run(_peak_rss_mb)
    raw_mb = summary.chips_written * 8 * len(BANDS) * (CELL / PIXEL) ** 2 * 2 / 1e6
    return {
        "chips": summary.chips_written,
        "seconds": seconds,
        "mb": raw_mb,
        "mb_s": raw_mb / seconds,
        "chips_s": summary.chips_written / seconds,
        "peak_worker_mb": max(peaks.values()),
        "idle_worker_mb": idle,
        "stored_mb": summary.bytes_written / 1e6,
    }


#: Rows in the order each round measures them: (row name, AOI size, engine or None for the raw bound).
ROWS = [
    ("raw-read bound (small AOI)", "small", None),
    ("eoprep odc-stac (small AOI)", "small", "odc-stac"),
    ("eoprep stackstac (small AOI)", "small", "stackstac"),
    ("eoprep rasterio (small AOI)", "small", "rasterio"),
    ("raw-read bound (large AOI)", "large", None),
    ("eoprep odc-stac (large AOI)", "large", "odc-stac"),
    ("eoprep rasterio (large AOI)", "large", "rasterio"),
]


def _summary(runs: list[dict[str, float]]) -> dict[str, Any]:
    """The median run's numbers (by time), every run's seconds, and the peak memory of the worst run."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    row = dict(ordered[len(ordered) // 2])
    row["runs_s"] = [r["seconds"] for r in runs]
    if "peak_worker_mb" in row:
        row["peak_worker_mb"] = max(r["peak_worker_mb"] for r in runs)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every row, interleaved (default 3)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in ROWS}
    with tempfile.TemporaryDirectory(prefix="eoprep-bench-") as tmp:
        root = Path(tmp)
        archive = demo_archive(default_data_dir() / "bench-archive", bbox=ARCHIVE_BBOX, say=print)
        items = [i for i in archive.items if i["collection"] == S2_COLLECTION]
        server = LocalStacServer(root / "catalog")
        server.start()
        try:
            server.load(archive.collections, archive.items)
            eoprep_run(server.url, root / "warm-up", SMALL_AOI, "odc-stac", args.workers)
            for r in range(args.rounds):
                for i, (name, size, engine) in enumerate(ROWS):
                    bbox = SMALL_AOI if size == "small" else LARGE_AOI
                    if engine is None:
                        runs[name].append(raw_bound(items, bbox, args.workers))
                    else:
                        runs[name].append(eoprep_run(server.url, root / f"r{r}-{i}", bbox, engine, args.workers))
                print(f"round {r + 1}/{args.rounds} done", flush=True)
        finally:
            server.destroy()
    rows = {name: _summary(row_runs) for name, row_runs in runs.items()}
    # Ratios compare chips/s: both sides make the same chips. MB/s differ in what they count (the raw
    # bound the windows of the scenes that exist, eoprep whole chips including empty time slots). Each
    # round's eoprep run is divided by the same round's bound, so a slow spell of the machine hits both.
    bound = {size: [b["chips_s"] for b in runs[f"raw-read bound ({size} AOI)"]] for size in ("small", "large")}
    print(
        f"\n{'run (median of ' + str(args.rounds) + ' rounds)':32} {'chips':>6} {'s':>7} {'chips/s':>8} "
        f"{'MB/s':>7} {'x bound':>8} {'x bound, range':>15} {'peak worker MB':>22}"
    )
    for name, row in rows.items():
        size = "large" if "large" in name else "small"
        ratios = sorted(run["chips_s"] / b for run, b in zip(runs[name], bound[size], strict=True))
        row["ratio_to_bound"] = ratios[len(ratios) // 2]
        row["ratio_range"] = [ratios[0], ratios[-1]]
        peak = f"{row['peak_worker_mb']:.0f} ({row['idle_worker_mb']:.0f} idle)" if "peak_worker_mb" in row else "-"
        spread = f"{ratios[0]:.2f}-{ratios[-1]:.2f}"
        print(
            f"{name:32} {row['chips']:>6} {row['seconds']:>7.2f} {row['chips_s']:>8.2f} {row['mb_s']:>7.1f} "
            f"{row['ratio_to_bound']:>8.2f} {spread:>15} {peak:>22}"
        )
    small, large = rows["eoprep rasterio (small AOI)"], rows["eoprep rasterio (large AOI)"]
    result = {
        "workers": args.workers,
        "rounds": args.rounds,
        "rows": rows,
        "odc_vs_stackstac_speed": rows["eoprep odc-stac (small AOI)"]["chips_s"]
        / rows["eoprep stackstac (small AOI)"]["chips_s"],
        "peak_memory_growth_large_vs_small": large["peak_worker_mb"] / small["peak_worker_mb"],
        "aoi_growth": large["chips"] / small["chips"],
    }
    print(
        f"\nodc-stac / stackstac speed: {result['odc_vs_stackstac_speed']:.2f}; peak worker memory large/small AOI: "
        f"{result['peak_memory_growth_large_vs_small']:.2f} for {result['aoi_growth']:.1f}x the chips"
    )
    print(json.dumps(result, default=float))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
