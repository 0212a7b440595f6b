"""Worker processes get their settings where the libraries read them."""

from __future__ import annotations

import os
import resource

import numpy as np

from eoprep.runtime._cluster import WORKER_ENV


def _faults_of_reallocated_buffers() -> int:
    """Page faults of allocating, filling and freeing a chip-sized buffer again and again, after the first."""
    np.ones(2**22, dtype=np.float32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        np.ones(2**22, dtype=np.float32)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_workers_reuse_freed_chip_buffers_instead_of_faulting_them_in_again(client):
    # Under Dask's own malloc settings each 16 MB buffer is a fresh mapping: ~4,000 faults each, ~20,000 here.
    futures = [client.submit(_faults_of_reallocated_buffers, pure=False, workers=[w]) for w in client.run(os.getpid)]
    assert all(faults < 2000 for faults in client.gather(futures)), client.gather(futures)


def test_workers_read_files_with_the_gdal_settings(client):
    for worker, env in client.run(lambda: {name: os.environ.get(name) for name in WORKER_ENV}).items():
        assert env == WORKER_ENV, worker
