"""Worker processes get their settings where the libraries read them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from eoprep.runtime._cluster import WORKER_ENV, WORKER_MALLOC


def _startup_environment() -> dict[str, str]:
    """The environment the process was started with: what glibc read, whatever os.environ says now."""
    text = Path("/proc/self/environ").read_bytes().decode(errors="replace")
    return dict(entry.split("=", 1) for entry in text.split("\0") if "=" in entry)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_workers_start_with_the_malloc_settings(client):
    for worker, env in client.run(_startup_environment).items():
        for name, value in WORKER_MALLOC.items():
            assert env.get(name) == value, f"{worker} started without {name}={value}"


def test_workers_read_files_with_the_gdal_settings(client):
    for worker, env in client.run(lambda: {name: os.environ.get(name) for name in WORKER_ENV}).items():
        assert env == WORKER_ENV, worker
