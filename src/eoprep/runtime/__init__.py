"""Runtime: the Dask side — which cluster, what workers know, how progress is shown."""

from __future__ import annotations

from eoprep.runtime._cluster import dask_client

__all__ = ["dask_client"]
