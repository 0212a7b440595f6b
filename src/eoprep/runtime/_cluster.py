"""Start a LocalCluster with processes, or join an existing scheduler."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from typing import Any

from distributed import Client, LocalCluster, WorkerPlugin

from eoprep._malloc import pretouch_heap, tune_malloc
from eoprep.errors import EoprepError

__all__ = ["ClientLike", "dask_client", "dask_client_in_background", "resolve_client"]

#: A client, or a function that returns one once its cluster is up (`dask_client_in_background`).
ClientLike = Client | Callable[[], Client]


def resolve_client(client: ClientLike) -> tuple[Client, float]:
    """The client to submit to, and the seconds spent waiting for its cluster to start (not the run's
    own time). Call it only when tasks are ready."""
    if isinstance(client, Client):
        return client, 0.0
    before = time.perf_counter()
    ready = client()
    return ready, time.perf_counter() - before


#: GDAL settings every worker reads files with; set in the worker environment, not on the client.
#: The block cache holds the COG tiles a row of chips shares with the next row, which the same
#: worker reads next (the pipeline keeps neighbouring shards on one worker): with 128 MB the large
#: AOI of ``benchmarks/pipeline_throughput.py`` ran in 2.5 s instead of 2.9 s (64 MB, tiles decoded
#: twice), for ~50 MB more peak worker memory; 256 MB was no faster and cost 150 MB more.
WORKER_ENV = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_CACHEMAX": "128",
    "GDAL_HTTP_MAX_RETRY": "3",
    "GDAL_HTTP_RETRY_DELAY": "1",
}


#: MB of heap each worker's task thread touches as it starts (`eoprep._malloc.pretouch_heap`); the
#: environment variable sets it per worker, 0 turns it off. 256 MB is about what the first shard of
#: ``benchmarks/pipeline_throughput.py`` faults in (GDAL's 128 MB block cache, rows and chips of 256²);
#: an idle worker holds it, a busy one uses it anyway.
HEAP_ENV = "EOPREP_WORKER_HEAP_MB"
DEFAULT_HEAP_MB = 256


class _Preload(WorkerPlugin):
    """Tune malloc, import the readers and warm them up when a worker starts (on a LocalCluster or a
    cluster joined with ``--scheduler``), so the first chip does not pay seconds of imports, nor the
    page faults of a fresh heap."""

    name = "eoprep-preload"

    async def setup(self, worker: Any) -> None:
        tuned = tune_malloc()
        import odc.stac  # noqa: F401
        import rasterio  # noqa: F401
        import zarr  # noqa: F401

        import eoprep.pipeline  # noqa: F401
        from eoprep.sources import warm_up_readers

        warm_up_readers()
        mb = _heap_mb()
        if tuned and mb:
            # In the thread that runs the tasks: each thread allocates from its own malloc arena.
            await asyncio.wrap_future(worker.executors["default"].submit(pretouch_heap, mb))


def _heap_mb() -> int:
    value = os.environ.get(HEAP_ENV, "")
    try:
        return max(0, int(value)) if value.strip() else DEFAULT_HEAP_MB
    except ValueError:
        raise EoprepError(f"{HEAP_ENV}: {value!r} is not a whole number of MB") from None


@contextmanager
def dask_client(
    *, scheduler: str | None = None, workers: int | None = None, say: Callable[[str], None] = print
) -> Iterator[Client]:
    """A client on a fresh LocalCluster (processes, one thread each) or on ``scheduler``.

    Processes, not threads: the chip tasks hold the GIL in numpy/GDAL glue, and process workers
    exercise pickling and worker environments the way a real cluster does.
    """
    _heap_mb()  # a bad setting fails here, in one line, not in every worker's plugin
    if scheduler:
        try:
            client = Client(scheduler, timeout="15s")
        except (OSError, TimeoutError) as exc:
            raise EoprepError(f"--scheduler: cannot connect to the Dask scheduler at {scheduler} ({exc})") from None
        client.register_plugin(_Preload())
        say(f"Dask scheduler {scheduler} · dashboard {client.dashboard_link}")
        try:
            yield client
        finally:
            client.close()
        return
    n = workers or max(1, min(os.cpu_count() or 1, 8))
    cluster = LocalCluster(
        n_workers=n,
        threads_per_worker=1,
        processes=True,
        dashboard_address="127.0.0.1:0",
        silence_logs=logging.ERROR,
        env=WORKER_ENV,
        memory_limit="auto",
    )
    client = Client(cluster)
    client.register_plugin(_Preload())
    say(f"Dask LocalCluster: {n} worker processes · dashboard {client.dashboard_link}")
    try:
        yield client
    finally:
        client.close()
        cluster.close()


@contextmanager
def dask_client_in_background(
    *, scheduler: str | None = None, workers: int | None = None, say: Callable[[str], None] = print
) -> Iterator[Callable[[], Client]]:
    """`dask_client` started in a thread; yields a function that waits for the client.

    A LocalCluster takes seconds to start its workers, and so do the embedded catalog and a search of
    a remote STAC API: the caller does those meanwhile and waits only when it has tasks to submit.
    On the way out the cluster is waited for (a half-started cluster cannot be closed) and closed.
    """
    stack = ExitStack()
    with ThreadPoolExecutor(1, thread_name_prefix="eoprep-cluster-start") as pool:
        started = pool.submit(stack.enter_context, dask_client(scheduler=scheduler, workers=workers, say=say))
        try:
            yield started.result
        finally:
            with contextlib.suppress(Exception):
                started.result()  # the caller saw a failed start when it asked for the client
            stack.close()
