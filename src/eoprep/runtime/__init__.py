"""Runtime: the Dask side — which cluster, what workers know, how progress is shown."""

from __future__ import annotations

from eoprep.runtime._cluster import ClientLike, dask_client, dask_client_in_background, resolve_client

__all__ = ["ClientLike", "dask_client", "dask_client_in_background", "resolve_client"]
