"""The feature store: one flat GeoParquet table, the same vectors as a Zarr array, a STAC collection.

Layout of a store directory::

    features.parquet   GeoParquet, one row per chip: id, geometry (lon/lat), embedding
                       (fixed-size list of float), start/end_datetime, collection, sensor,
                       valid_fraction, cloud_fraction, model, model_version, spec_hash, row
    embeddings.zarr    Zarr v3: embedding (chip, dim), chip (chip) ids; row i = table row i
    collection.json    STAC collection: model, bands, dimension, normalisation, extent
    ann.faiss          HNSW index over the unit vectors, only when the store is large

The table is the commit point. An append writes the new rows of the Zarr array past the committed
ones, then replaces the table, the collection and the index, each through a temporary file and a
rename: a reader sees the old store or the new one, and rows past the table's end (left by a run
that died) are overwritten by the next append.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from eoprep import __version__
from eoprep.errors import EoprepError
from eoprep.sinks import atomic_write

__all__ = ["ANN_FILE", "STAC_FILE", "TABLE_FILE", "VECTORS_STORE", "FeatureStore", "unit_vectors"]

TABLE_FILE = "features.parquet"
VECTORS_STORE = "embeddings.zarr"
STAC_FILE = "collection.json"
ANN_FILE = "ann.faiss"
_ROWS_PER_CHUNK = 4096


class FeatureStore:
    """A feature store directory: read its table and vectors, append new chips.

    Parameters
    ----------
    path : str or Path
        The store directory (created on the first append).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def exists(self) -> bool:
        """Whether a table has been committed."""
        return (self.path / TABLE_FILE).is_file()

    def metadata(self) -> dict[str, Any]:
        """Model and spec of the store, as recorded in the table's schema metadata."""
        raw = pq.read_schema(self.path / TABLE_FILE).metadata or {}
        return json.loads(raw.get(b"eoprep:embedding", b"{}"))

    def table(self, columns: list[str] | None = None) -> gpd.GeoDataFrame:
        """The rows of the store (without the embedding column unless asked for)."""
        if not self.exists():
            raise EoprepError(f"{self.path}: not a feature store (no {TABLE_FILE}); create it with `eoprep embed`")
        if columns is None:
            columns = [f for f in pq.read_schema(self.path / TABLE_FILE).names if f != "embedding"]
        return gpd.read_parquet(self.path / TABLE_FILE, columns=columns)

    def ids(self) -> list[str]:
        """Chip ids in row order."""
        if not self.exists():
            return []
        return pq.read_table(self.path / TABLE_FILE, columns=["id"])["id"].to_pylist()

    def vectors(self) -> np.ndarray:
        """All embeddings ``(rows, dim)`` as float32, read from the table's fixed-size list column."""
        column = pq.read_table(self.path / TABLE_FILE, columns=["embedding"])["embedding"].combine_chunks()
        dim = column.type.list_size
        return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)

    def append(
        self, rows: gpd.GeoDataFrame, vectors: np.ndarray, info: dict[str, Any], *, dtype: str, ann_threshold: int
    ) -> int:
        """Add chips (rows in lon/lat, one vector each) and return the number of rows in the store.

        ``info`` (model, version, bands, dimension, normalisation, spec hash) must equal what the
        store was created with: vectors of two models in one store are not comparable.
        """
        if len(rows) != len(vectors):
            raise ValueError(f"{len(rows)} rows but {len(vectors)} vectors")
        old = self.table() if self.exists() else None
        if old is not None:
            self.check_compatible(info)
        n0 = 0 if old is None else len(old)
        self._write_vectors(n0, rows["id"].tolist(), vectors, dtype)
        rows = rows.assign(row=np.arange(n0, n0 + len(rows), dtype=np.int64))
        merged = rows if old is None else gpd.GeoDataFrame(pd.concat([old, rows], ignore_index=True), crs=rows.crs)
        all_vectors = vectors if old is None else np.concatenate([self.vectors(), vectors])
        self._write_table(merged, all_vectors.astype(dtype), info)
        atomic_write(self.path / STAC_FILE, lambda p: p.write_text(json.dumps(_collection(merged, info), indent=1)))
        self._write_ann(all_vectors, ann_threshold)
        return len(merged)

    def check_compatible(self, info: dict[str, Any]) -> None:
        """Refuse to mix vectors of another model, weights or spec into this store."""
        have = self.metadata()
        keys = ("model", "model_version", "weights", "spec_hash", "dimension")
        diff = {k: (have.get(k), info.get(k)) for k in keys if have.get(k) != info.get(k)}
        if diff:
            raise EoprepError(
                f"output.path: {self.path} holds vectors of another model or spec ({diff}: store vs spec); "
                "vectors of different models are not comparable. Use a new output.path."
            )

    def _write_vectors(self, start: int, ids: list[str], vectors: np.ndarray, dtype: str) -> None:
        url = str(self.path / VECTORS_STORE)
        root = zarr.open_group(url, mode="a", zarr_format=3)
        dim = vectors.shape[1]
        if "embedding" not in root:
            root.create_array(
                "embedding", shape=(0, dim), chunks=(_ROWS_PER_CHUNK, dim), dtype=dtype, dimension_names=("chip", "dim")
            )
            root.create_array("chip", shape=(0,), chunks=(_ROWS_PER_CHUNK,), dtype=str, dimension_names=("chip",))
        emb, chip = root["embedding"], root["chip"]
        emb.resize((start + len(ids), dim))
        chip.resize((start + len(ids),))
        emb[start:] = vectors.astype(dtype)
        chip[start:] = np.array(ids, dtype=object)
        root.attrs.update({"eoprep:version": __version__, "eoprep:rows": start + len(ids)})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(url)

    def _write_table(self, frame: gpd.GeoDataFrame, vectors: np.ndarray, info: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        table = pq.read_table(pa.BufferReader(buffer.getvalue()))
        flat = pa.array(vectors.reshape(-1), type=pa.float16() if vectors.dtype == np.float16 else pa.float32())
        table = table.append_column("embedding", pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]))
        meta = dict(table.schema.metadata or {})
        meta[b"eoprep:embedding"] = json.dumps(info).encode()
        table = table.replace_schema_metadata(meta)
        atomic_write(self.path / TABLE_FILE, lambda p: pq.write_table(table, p, compression="zstd"))

    def _write_ann(self, vectors: np.ndarray, threshold: int) -> None:
        path = self.path / ANN_FILE
        if len(vectors) < threshold:
            path.unlink(missing_ok=True)
            return
        import faiss

        index = faiss.IndexHNSWFlat(vectors.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        index.add(unit_vectors(vectors))
        atomic_write(path, lambda p: faiss.write_index(index, str(p)))


def unit_vectors(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), so inner products are cosines."""
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def _collection(table: gpd.GeoDataFrame, info: dict[str, Any]) -> dict[str, Any]:
    """STAC collection of the store, with the model description GeoEmbedding-style catalogs carry."""
    w, s, e, n = (float(v) for v in table.total_bounds)
    start = pd.Timestamp(table["start_datetime"].min()).isoformat()
    end = pd.Timestamp(table["end_datetime"].max()).isoformat()
    return {
        "type": "Collection",
        "stac_version": "1.1.0",
        "id": info["name"],
        "title": f"{info['model']} embeddings of {info['input']['group']} chips",
        "description": (
            f"One {info['dimension']}-dimensional {info['model']} ({info['model_version']}) embedding per chip of "
            f"{info['input']['path']} group {info['input']['group']!r}, written by eoprep {__version__}."
        ),
        "license": "proprietary",
        "extent": {"spatial": {"bbox": [[w, s, e, n]]}, "temporal": {"interval": [[start, end]]}},
        "summaries": {"sensor": sorted(table["sensor"].unique().tolist())},
        "eoprep:embedding": info,
        "assets": {
            "table": {
                "href": f"./{TABLE_FILE}",
                "type": "application/vnd.apache.parquet",
                "roles": ["data"],
                "title": "GeoParquet: one row per chip with its embedding",
            },
            "vectors": {
                "href": f"./{VECTORS_STORE}",
                "type": "application/vnd+zarr",
                "roles": ["data"],
                "title": "Zarr array embedding (chip, dim)",
            },
        },
        "links": [],
    }
