"""Worker processes get their settings where the libraries read them."""

from __future__ import annotations

import ctypes
import os
import resource

import numpy as np
import pytest

from eoprep.errors import EoprepError
from eoprep.runtime import dask_client
from eoprep.runtime._cluster import HEAP_ENV, WORKER_ENV


def _faults_of_reallocated_buffers() -> int:
    """Median page faults of mallocing, filling and freeing a 16 MB buffer, over ten rounds after the first.

    Through libc's malloc, not numpy: numpy asks for transparent huge pages, which fault 2 MB at a time
    when the kernel has them free and 4 KiB at a time when not. The median, not the sum: in a worker that
    ran other tests the heap may grow under one round; what is tested is that the others reuse its pages.
    """
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 2**24
    faults = []
    for _ in range(11):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffer = libc.malloc(size)
        ctypes.memset(buffer, 1, size)
        libc.free(buffer)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return int(np.median(faults[1:]))


def test_workers_reuse_freed_chip_buffers_instead_of_faulting_them_in_again(client):
    # Under Dask's own malloc settings each 16 MB buffer is a fresh mapping: ~4,000 faults every round.
    futures = [client.submit(_faults_of_reallocated_buffers, pure=False, workers=[w]) for w in client.run(os.getpid)]
    assert all(faults < 400 for faults in client.gather(futures)), client.gather(futures)


def test_workers_read_files_with_the_gdal_settings(client):
    for worker, env in client.run(lambda: {name: os.environ.get(name) for name in WORKER_ENV}).items():
        assert env == WORKER_ENV, worker


def _stac_hooks_found() -> bool:
    import pystac

    return pystac.EXTENSION_HOOKS._discovered


def test_workers_start_with_pystac_extension_hooks_found(client):
    # Found on a process's first item parse by scanning entry points; a worker's first shard waited for it.
    assert all(client.run(_stac_hooks_found).values())


def _faults_of_touching_224_mb() -> int:
    from eoprep._malloc import pretouch_heap

    ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB faults whatever the kernel's THP mode
    return pretouch_heap(224)


@pytest.mark.parametrize("heap_mb", ["256", "0"])
def test_a_fresh_worker_starts_with_its_task_heap_touched(monkeypatch, heap_mb):
    # ~57,000 faults for 224 MB of fresh pages (the first shard of a worker faulted in ~170 MB); more
    # than the 128 MB glibc keeps of a task thread's arena without the top pad.
    monkeypatch.setenv(HEAP_ENV, heap_mb)
    with dask_client(workers=1, say=lambda _m: None) as fresh:
        faults = fresh.submit(_faults_of_touching_224_mb, pure=False).result()
    assert faults < 3000 if heap_mb != "0" else faults > 50000, faults


def test_a_bad_heap_setting_is_one_line_naming_it(monkeypatch):
    monkeypatch.setenv(HEAP_ENV, "lots")
    with pytest.raises(EoprepError, match=f"^{HEAP_ENV}: 'lots' is not a whole number of MB$"):
        with dask_client(workers=1, say=lambda _m: None):
            pass


def test_joining_a_running_scheduler_sets_up_its_workers_and_runs(stac_api, tmp_path):
    from distributed import LocalCluster

    from conftest import make_spec
    from eoprep.pipeline import run_pipeline

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with dask_client(scheduler=cluster.scheduler_address, say=lambda _m: None) as joined:
            assert all(joined.run(_stac_hooks_found).values())
            heap = joined.submit(_faults_of_touching_224_mb, pure=False).result()
            summary = run_pipeline(
                make_spec(tmp_path / "out"), client=joined, catalog_url=stac_api, say=lambda _m: None
            )
    assert heap < 3000, heap
    assert summary.chips_written == summary.chips_planned > 0
