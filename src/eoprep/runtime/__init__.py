"""Runtime: the Dask side — which cluster, what workers know, how progress is shown."""

from __future__ import annotations

from eoprep.runtime._cluster import dask_client, dask_client_in_background

__all__ = ["dask_client", "dask_client_in_background"]
