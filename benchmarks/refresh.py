"""Incremental refresh against a full rebuild, measured in one run on the real local STAC API.

An archive of N Sentinel-2 dates over many chips is built with N-1 dates; then

* a no-op refresh (nothing new) runs, and
* the N-th date is published and a refresh picks it up,

and both are compared with a full rebuild over all N dates (fresh output). Every run starts its own
LocalCluster, as a scheduled ``eoprep run`` does; the clock starts once it is up. Targets:
the no-op refresh writes 0 chunk bytes and costs < 5 % of a full run; adding one date of N costs
at most 1.5/N of a full run. Each layout is measured in ``--rounds`` rounds (a fresh collection and
output each); every run is divided by its own round's full rebuild, and the median and range shown.

    .venv/bin/python benchmarks/refresh.py [--workers 2] [--engine odc-stac] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

from eoprep.catalog_server import LocalStacServer
from eoprep.config import parse_spec
from eoprep.demo import DEMO_DATETIME, S2_COLLECTION, generate_archive
from eoprep.pipeline import RunSummary, run_pipeline
from eoprep.runtime import dask_client

ARCHIVE_BBOX = (9.00, 45.40, 9.14, 45.50)
AOI = [9.01, 45.41, 9.13, 45.49]
BANDS = ["B02", "B03", "B04", "B08", "B11", "B12", "SCL"]
COLLECTION = "bench-refresh-s2"


def _spec(url: str, out: Path, engine: str, window: str | None, collection: str):
    return parse_spec(
        {
            "name": "bench-refresh",
            "source": {
                "url": url,
                "collections": [{"id": collection, "name": "s2", "bands": BANDS}],
                "aoi": {"bbox": AOI},
                "datetime": DEMO_DATETIME,
            },
            "grid": {"cell_size": 2560, "pixel_size": 10},
            "time": {"mode": "scenes", "max_scenes": 8, "window": window},
            "loader": {"engine": engine},
            "output": {"path": str(out), "chips_per_shard": 4},
        }
    )


def _timed(spec, workers: int) -> tuple[RunSummary, float]:
    """One run in a fresh LocalCluster, timed once the cluster is up.

    A scheduled refresh and a full rebuild each start their own cluster (``eoprep run`` from cron);
    in one shared cluster the rebuild found the scenes the earlier runs had read still decoded in
    the workers' GDAL block caches, and looked faster than it is.
    """
    with dask_client(workers=workers, say=lambda _m: None) as client:
        start = time.perf_counter()
        summary = run_pipeline(spec, client=client, say=lambda _m: None)
        return summary, time.perf_counter() - start


#: Two ways to lay an archive out in time: one chip per cell holding the whole series (a new date
#: touches every chip), or one chip per cell and 10-day window (a new date adds chips of its window).
LAYOUTS = {"time-series chips (one window)": None, "per-window chips (10D)": "10D"}


def _round(
    server: LocalStacServer, root: Path, args: argparse.Namespace, window: str | None, items: list, n: int
) -> dict[str, tuple[RunSummary, float]]:
    """One round: the initial build over N-1 dates, a no-op refresh, the N-th date, a full rebuild."""

    def spec(out: str):
        return _spec(server.url, root / out, args.engine, window, items[0]["collection"])

    initial = _timed(spec("archive-out"), args.workers)
    noop = _timed(spec("archive-out"), args.workers)
    server.load([], items)
    added = _timed(spec("archive-out"), args.workers)
    full = _timed(spec("rebuild-out"), args.workers)
    return {
        f"initial build ({n - 1} dates)": initial,
        "no-op refresh": noop,
        f"refresh adding date {n} of {n}": added,
        f"full rebuild ({n} dates)": full,
    }


def _report(layout: str, rounds: list[dict[str, tuple[RunSummary, float]]], n: int) -> dict:
    """Median seconds per row, and each run over its own round's full rebuild (median and range)."""
    full_name = f"full rebuild ({n} dates)"
    print(f"\n{layout} (median of {len(rounds)} rounds)")
    print(f"{'run':32} {'chips written':>14} {'MB written':>11} {'s':>7} {'x full':>7} {'x full, range':>14}")
    ratios: dict[str, list[float]] = {}
    for name in rounds[0]:
        summary = rounds[0][name][0]
        seconds = sorted(r[name][1] for r in rounds)
        ratios[name] = sorted(r[name][1] / r[full_name][1] for r in rounds)
        mid = ratios[name][len(rounds) // 2]
        print(
            f"{name:32} {summary.chips_written:>14} {summary.bytes_written / 1e6:>11.1f} "
            f"{seconds[len(rounds) // 2]:>7.2f} {mid:>7.3f} {ratios[name][0]:>6.3f}-{ratios[name][-1]:.3f}"
        )
    noop, added = ratios["no-op refresh"], ratios[f"refresh adding date {n} of {n}"]
    noop_bytes = max(r["no-op refresh"][0].bytes_written for r in rounds)
    result = {
        "layout": layout,
        "rounds": len(rounds),
        "chips": rounds[0][full_name][0].chips_written,
        "noop_bytes_written": noop_bytes,
        "noop_over_full": noop[len(noop) // 2],
        "noop_over_full_range": [noop[0], noop[-1]],
        "add_one_date_over_full": added[len(added) // 2],
        "add_one_date_over_full_range": [added[0], added[-1]],
        "target_add_one_date": 1.5 / n,
    }
    result["noop_target_met"] = noop_bytes == 0 and result["noop_over_full"] < 0.05
    result["add_target_met"] = result["add_one_date_over_full"] <= 1.5 / n
    print(
        f"no-op: {result['noop_over_full']:.3f} of a full run, {noop_bytes} chunk bytes "
        f"(target < 0.05 and 0); one new date: {result['add_one_date_over_full']:.3f} of a full run "
        f"(target <= {result['target_add_one_date']:.3f})"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--engine", default="odc-stac", choices=["odc-stac", "stackstac", "rasterio"])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per layout, each on a fresh collection")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="eoprep-bench-refresh-") as tmp:
        root = Path(tmp)
        print("generating the archive …", flush=True)
        archive = generate_archive(root / "archive", bbox=ARCHIVE_BBOX)
        s2 = [i for i in archive.items if i["collection"] == S2_COLLECTION]
        n = len(s2)
        server = LocalStacServer(root / "catalog")
        server.start()
        results = []
        try:
            for k, (layout, window) in enumerate(LAYOUTS.items()):
                rounds = []
                for r in range(args.rounds):
                    coll = copy.deepcopy(next(c for c in archive.collections if c["id"] == S2_COLLECTION))
                    coll["id"] = f"{COLLECTION}-{k}-{r}"
                    items = [dict(copy.deepcopy(i), collection=coll["id"]) for i in s2]
                    server.load([coll], items[: n - 1])
                    rounds.append(_round(server, root / f"layout{k}-{r}", args, window, items, n))
                results.append(_report(layout, rounds, n))
        finally:
            server.destroy()
    result = {"engine": args.engine, "workers": args.workers, "dates": n, "layouts": results}
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
