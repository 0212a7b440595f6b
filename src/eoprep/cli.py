"""Command line: parses arguments and calls the library; user errors print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from eoprep import __version__
from eoprep.config import EMBEDDED, PipelineSpec, load_spec
from eoprep.errors import EoprepError

if TYPE_CHECKING:
    from distributed import Client

    from eoprep.pipeline import RunSummary

__all__ = ["main"]

DEMO_SPEC = Path(__file__).parent / "demo" / "demo.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eoprep", description="Earth-observation archives to training-ready chips.")
    parser.add_argument("--version", action="version", version=f"eoprep {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a pipeline spec")
    run.add_argument("spec", type=Path)
    _cluster_args(run)
    run.add_argument("--catalog", help="STAC API URL to use instead of the spec's source.url")
    run.add_argument("--json", action="store_true", help="print the summary as JSON")

    refresh = sub.add_parser("refresh", help="bring an output up to date: only new or changed inputs are fetched")
    refresh.add_argument("spec", type=Path)
    _cluster_args(refresh)
    refresh.add_argument("--catalog", help="STAC API URL to use instead of the spec's source.url")
    refresh.add_argument("--wait", action="store_true", help="wait for a refresh already writing this output")
    refresh.add_argument("--json", action="store_true", help="print the summary as JSON")

    schedule = sub.add_parser("schedule", help="run refreshes on a cron schedule (UTC) until SIGTERM/Ctrl-C")
    schedule.add_argument("spec", type=Path)
    schedule.add_argument("--cron", required=True, help='five-field cron expression, e.g. "0 2 * * *"')
    _cluster_args(schedule)
    schedule.add_argument("--catalog", help="STAC API URL to use instead of the spec's source.url")

    demo = sub.add_parser("demo", help="generate the demo archive, serve it and run the demo pipeline on it")
    demo.add_argument("--output", default="out/demo", help="output directory (default: out/demo)")
    _cluster_args(demo)

    serve = sub.add_parser("serve-catalog", help="serve the demo archive from a local STAC API until Ctrl-C")
    serve.add_argument("--port", type=int, default=None)

    inspect = sub.add_parser("inspect", help="show the chips and runs of an output directory")
    inspect.add_argument("output", type=Path)
    inspect.add_argument("--chip", help="show where one chip's pixels came from")

    bench = sub.add_parser("bench", help="benchmarks on the output of a pipeline spec")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    codecs = bench_sub.add_parser(
        "codecs", help="rate–distortion of every codec (and the xarrayvideo recipe) on chips of a spec's output"
    )
    codecs.add_argument("--spec", type=Path, required=True, help="pipeline spec whose output was written by `run`")
    codecs.add_argument(
        "--out", type=Path, default=None, help="folder for rd.csv and rd.png (default: OUT/bench-codecs)"
    )
    codecs.add_argument("--chips", type=int, default=4, help="chips per collection group (default: 4)")
    codecs.add_argument("--quick", action="store_true", help="three settings per codec, for a smoke run")

    embed = sub.add_parser("embed", help="encode the chips of an output into a feature store (embed spec)")
    embed.add_argument("spec", type=Path)
    _cluster_args(embed)
    embed.add_argument("--json", action="store_true", help="print the summary as JSON")

    search = sub.add_parser("search", help="nearest chips in a feature store")
    search.add_argument("store", type=Path)
    query = search.add_mutually_exclusive_group()
    query.add_argument("--chip", help="query with this chip's embedding")
    query.add_argument("--vector", type=Path, help="query with a vector (.npy, .json list or text)")
    search.add_argument(
        "--bbox",
        type=float,
        nargs=4,
        metavar=("W", "S", "E", "N"),
        help="lon/lat box: alone, query with its chips; with --chip/--vector, search only inside it",
    )
    search.add_argument("-k", type=_at_least_one, default=10, help="number of results (default 10)")
    search.add_argument("--exact", action="store_true", help="exact search even when the store has an ANN index")
    search.add_argument("--json", action="store_true", help="print the matches as JSON lines")
    return parser


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", help="address of an existing Dask scheduler (default: start a LocalCluster)")
    p.add_argument("--workers", type=_at_least_one, default=None, help="worker processes of the LocalCluster")


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console(stderr=True, highlight=False)
    try:
        return _COMMANDS[args.command](args, console)
    except EoprepError as exc:
        if args.debug:
            console.print_exception()
        console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130


def _say(console: Console) -> Callable[[str], None]:
    return lambda msg: console.print(msg, soft_wrap=True)


def _run_spec(
    spec: PipelineSpec, args: argparse.Namespace, console: Console, catalog: str | None, client: Callable[[], Client]
) -> int:
    from eoprep.pipeline import run_pipeline

    with Progress(
        TextColumn("chips"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task("chips", total=None, visible=False)  # shown once there is work
        summary = run_pipeline(
            spec,
            client=client,
            catalog_url=catalog,
            say=lambda m: bar.console.print(m, soft_wrap=True),
            progress=lambda done, total: bar.update(task, completed=done, total=total, visible=True),
            wait=getattr(args, "wait", False),
        )
    if getattr(args, "json", False):
        print(json.dumps(summary.to_dict(), default=str))
    else:
        _print_summary(console, summary)
    return 0


def _print_summary(console: Console, summary: RunSummary) -> None:
    table = Table(title=f"run {summary.run_id}", show_header=False)
    table.add_row("output", summary.output)
    table.add_row("chips written", str(summary.chips_written))
    table.add_row("  of which rewritten (inputs changed)", str(summary.chips_updated))
    table.add_row("chips up to date", str(summary.chips_present))
    table.add_row("chips skipped", str(len(summary.skipped)))
    table.add_row("bytes written", f"{summary.bytes_written / 1e6:.1f} MB")
    table.add_row("time", f"{summary.seconds:.1f} s ({summary.mb_per_s:.1f} MB/s stored)")
    console.print(table)
    for chip, reason in summary.skipped:
        console.print(f"  skipped {chip}: {reason}", soft_wrap=True)


def _cmd_run(args: argparse.Namespace, console: Console) -> int:
    from eoprep.runtime import dask_client_in_background

    spec = load_spec(args.spec)
    # The cluster starts while the catalog starts and the spec is searched and planned.
    with dask_client_in_background(scheduler=args.scheduler, workers=args.workers, say=_say(console)) as client:
        if args.catalog or spec.source.url != EMBEDDED:
            return _run_spec(spec, args, console, args.catalog, client)
        from eoprep.embedded import embedded_catalog

        with embedded_catalog(say=_say(console)) as url:
            return _run_spec(spec, args, console, url, client)


def _cmd_schedule(args: argparse.Namespace, console: Console) -> int:
    import datetime as dt

    from eoprep.ops import CronSchedule

    cron = CronSchedule.parse(args.cron)
    load_spec(args.spec)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.is_set():
        when = cron.next_after(dt.datetime.now(dt.UTC))
        console.print(f"next refresh of {args.spec} at {when:%Y-%m-%d %H:%M} UTC", soft_wrap=True)
        if stop.wait(max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())):
            break
        try:
            _cmd_run(args, console)
        except EoprepError as exc:
            console.print(f"[bold red]refresh failed:[/] {exc}", soft_wrap=True)
    console.print("schedule stopped")
    return 0


def _cmd_demo(args: argparse.Namespace, console: Console) -> int:
    import yaml

    from eoprep.config import parse_spec
    from eoprep.embedded import embedded_catalog
    from eoprep.runtime import dask_client_in_background

    data = yaml.safe_load(DEMO_SPEC.read_text())
    data["output"]["path"] = args.output
    spec = parse_spec(data, origin=str(DEMO_SPEC))
    with dask_client_in_background(scheduler=args.scheduler, workers=args.workers, say=_say(console)) as client:
        with embedded_catalog(say=_say(console)) as url:
            code = _run_spec(spec, args, console, url, client)
    console.print(f"open it with: xarray.open_zarr('{Path(args.output) / 'chips.zarr'}', group='s2')")
    return code


def _cmd_serve(args: argparse.Namespace, console: Console) -> int:
    from eoprep.embedded import embedded_catalog

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with embedded_catalog(port=args.port, say=_say(console)) as url:
        console.print(f"serving {url} — Ctrl-C to stop")
        print(url, flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    console.print("stopped")
    return 0


def _cmd_inspect(args: argparse.Namespace, console: Console) -> int:
    from eoprep.sinks import INDEX_FILE, read_index

    out = args.output
    if not (out / INDEX_FILE).exists():
        raise EoprepError(f"{out}: not an eoprep output (no {INDEX_FILE})")
    index = read_index(out)
    if args.chip:
        rows = index[index["id"] == args.chip]
        if rows.empty:
            raise EoprepError(f"--chip: {args.chip} is not in {out / INDEX_FILE}")
        for _, row in rows.iterrows():
            console.print(
                f"{row['id']} ({row['collection']}) index {row['index']} · {row['n_scenes']} scenes · "
                f"valid {row['valid_fraction']:.2f} · items {row['item_ids']}",
                soft_wrap=True,
            )
        return 0
    table = Table(title=f"{out}: {index['id'].nunique()} chips")
    for col in ("collection", "chips", "scenes", "valid", "cloud"):
        table.add_column(col)
    for key, rows in index.groupby("collection"):
        table.add_row(
            str(key),
            str(len(rows)),
            str(int(rows["n_scenes"].sum())),
            f"{rows['valid_fraction'].mean():.2f}",
            f"{rows['cloud_fraction'].mean():.2f}",
        )
    console.print(table)
    runs = sorted((out / "runs").glob("*.json"))
    for path in runs:
        run = json.loads(path.read_text())["summary"]
        console.print(
            f"run {run['run_id']}: {run['chips_written']} written, {len(run['skipped'])} skipped, "
            f"{run['bytes_written'] / 1e6:.1f} MB in {run['seconds']:.1f} s"
        )
    return 0


def _cmd_bench(args: argparse.Namespace, console: Console) -> int:
    import functools
    import math

    from eoprep.codecs.bench import (
        DEFAULT_BASELINE_CRFS,
        QUICK_BASELINE_CRFS,
        cubes_from_output,
        default_specs,
        run_codec_benchmark,
        summarize,
    )
    from eoprep.sinks import CHIPS_STORE

    spec = load_spec(args.spec)
    output = Path(spec.output.path)
    if not (output / CHIPS_STORE / "zarr.json").exists():
        raise EoprepError(f"{output / CHIPS_STORE}: not found; write it with `eoprep run {args.spec}` first")
    if args.chips < 1:
        raise EoprepError(f"--chips: needs at least 1, got {args.chips}")
    out = args.out or output / "bench-codecs"
    cubes, nodata = cubes_from_output(output, chips=args.chips)
    console.print(f"benchmarking {len(cubes)} chips of {output} → {out}", soft_wrap=True)
    table = run_codec_benchmark(
        cubes,
        functools.partial(default_specs, quick=args.quick),
        out,
        baseline_crfs=QUICK_BASELINE_CRFS if args.quick else DEFAULT_BASELINE_CRFS,
        nodata=nodata,
    )
    groups = table["cube"].str.split("/").str[0]
    for group in dict.fromkeys(groups):
        rows = table[groups == group]
        first = cubes[rows["cube"].iloc[0]]
        bands, height, width = first.shape[1:]
        view = Table(
            title=f"{group}: {rows['cube'].nunique()} chips, {first.dtype}, {bands} bands, {height}×{width} px"
        )
        for column in ("codec", "PSNR @0.1 bpppb", "PSNR @1 bpppb", "lossless ratio"):
            view.add_column(column, justify="left" if column == "codec" else "right")
        for codec, row in summarize(rows).iterrows():
            cells = [row["psnr@0.1"], row["psnr@1"], row["lossless_ratio"]]
            view.add_row(str(codec), *("–" if math.isnan(v) else f"{v:.2f}" for v in cells))
        console.print(view)
    console.print(f"PSNR in dB on the data range; full table {out / 'rd.csv'}, plot {out / 'rd.png'}", soft_wrap=True)
    return 0


def _cmd_embed(args: argparse.Namespace, console: Console) -> int:
    from eoprep.embed import embed, load_embed_spec
    from eoprep.runtime import dask_client_in_background

    spec = load_embed_spec(args.spec)
    say = _say(console)
    with dask_client_in_background(scheduler=args.scheduler, workers=args.workers, say=say) as client:
        with Progress(
            TextColumn("chips"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as bar:
            task = bar.add_task("chips", total=None, visible=False)  # shown once there is work
            summary = embed(
                spec,
                client=client,
                say=lambda m: bar.console.print(m, soft_wrap=True),
                progress=lambda done, total: bar.update(task, completed=done, total=total, visible=True),
            )
    if args.json:
        print(json.dumps(summary.to_dict(), default=str))
        return 0
    table = Table(title=f"feature store {summary.store}", show_header=False)
    table.add_row("model", f"{summary.model} {summary.model_version} ({summary.dimension}-d)")
    table.add_row("device", summary.device)
    table.add_row("chips encoded", str(summary.chips_encoded))
    table.add_row("chips already present", str(summary.chips_present))
    table.add_row("chips not written upstream", str(summary.chips_skipped))
    table.add_row("rows in store", str(summary.rows))
    table.add_row("time", f"{summary.seconds:.1f} s ({summary.chips_per_s:.1f} chips/s)")
    console.print(table)
    return 0


def _cmd_search(args: argparse.Namespace, console: Console) -> int:
    from eoprep.embed import read_vector, search

    vector = read_vector(args.vector) if args.vector else None
    bbox = tuple(args.bbox) if args.bbox else None
    matches = search(args.store, chip=args.chip, vector=vector, bbox=bbox, k=args.k, exact=True if args.exact else None)
    if args.json:
        for row in matches.drop(columns="geometry").to_dict(orient="records"):
            print(json.dumps(row, default=str))
        return 0
    table = Table(title=f"{len(matches)} nearest chips in {args.store}")
    for col in ("rank", "id", "score", "sensor", "start", "end"):
        table.add_column(col)
    for row in matches.itertuples():
        table.add_row(
            str(row.rank),
            row.id,
            f"{row.score:.4f}",
            row.sensor,
            f"{row.start_datetime:%Y-%m-%d}",
            f"{row.end_datetime:%Y-%m-%d}",
        )
    console.print(table)
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace, Console], int]] = {
    "run": _cmd_run,
    "refresh": _cmd_run,
    "schedule": _cmd_schedule,
    "demo": _cmd_demo,
    "serve-catalog": _cmd_serve,
    "inspect": _cmd_inspect,
    "bench": _cmd_bench,
    "embed": _cmd_embed,
    "search": _cmd_search,
}


if __name__ == "__main__":
    sys.exit(main())
