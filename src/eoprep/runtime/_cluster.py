"""Start a LocalCluster with processes, or join an existing scheduler."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import dask
from distributed import Client, LocalCluster, WorkerPlugin

from eoprep.errors import EoprepError

__all__ = ["dask_client"]

#: GDAL settings every worker reads files with; set in the worker environment, not on the client.
WORKER_ENV = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_CACHEMAX": "256",
    "GDAL_HTTP_MAX_RETRY": "3",
    "GDAL_HTTP_RETRY_DELAY": "1",
}

#: glibc reads these once, when a process starts: Dask must put them in the environment it spawns a
#: worker with (``distributed.nanny.pre-spawn-environ``); set in a worker's ``env`` they come too late.
#: Dask's own 64 KiB trim threshold hands freed heap memory back at once, which also pins glibc's mmap
#: threshold at 128 KiB, so every chip-sized buffer of the next shard faults its pages in again: about
#: 400,000 page faults per 80 chips of 256², and tasks 1.45x slower (measured in one worker). Buffers
#: up to 64 MiB now come from the heap, and up to 256 MiB of freed heap (a shard's working set) stays.
WORKER_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": str(64 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(256 * 2**20),
}


class _Preload(WorkerPlugin):
    """Import the readers when a worker starts, so the first chip does not pay seconds of imports."""

    name = "eoprep-preload"

    def setup(self, worker: object) -> None:
        import odc.stac  # noqa: F401
        import rasterio  # noqa: F401
        import zarr  # noqa: F401

        import eoprep.pipeline  # noqa: F401


@contextmanager
def dask_client(
    *, scheduler: str | None = None, workers: int | None = None, say: Callable[[str], None] = print
) -> Iterator[Client]:
    """A client on a fresh LocalCluster (processes, one thread each) or on ``scheduler``.

    Processes, not threads: the chip tasks hold the GIL in numpy/GDAL glue, and process workers
    exercise pickling and worker environments the way a real cluster does.
    """
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
    with dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_MALLOC.items()}):
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
