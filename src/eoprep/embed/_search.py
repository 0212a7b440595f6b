"""Similarity search over a feature store: exact cosine on small stores, the HNSW index on large ones.

Needs no torch: a user with only the store and this module can search it.
"""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import shapely

from eoprep.embed._store import ANN_FILE, FeatureStore, unit_vectors
from eoprep.errors import EoprepError

__all__ = ["read_vector", "search"]


def read_vector(path: str | Path) -> np.ndarray:
    """A query vector from ``.npy`` or a JSON / whitespace-separated text list of numbers."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            values = np.load(path)
        elif path.suffix == ".json":
            values = np.asarray(json.loads(path.read_text()), dtype=np.float32)
        else:
            values = np.asarray(path.read_text().split(), dtype=np.float32)
    except (OSError, ValueError) as exc:
        raise EoprepError(f"--vector: cannot read {path} as a vector (.npy, .json list or numbers): {exc}") from None
    return np.asarray(values, dtype=np.float32).reshape(-1)


def search(
    store: str | Path | FeatureStore,
    *,
    chip: str | None = None,
    vector: np.ndarray | None = None,
    bbox: tuple[float, float, float, float] | None = None,
    k: int = 10,
    exact: bool | None = None,
) -> gpd.GeoDataFrame:
    """The ``k`` chips nearest (cosine) to a chip, a vector, or the chips of a bounding box.

    Parameters
    ----------
    store : str, Path or FeatureStore
        The feature store directory.
    chip : str, optional
        Query with this chip's embedding; the chip itself is left out of the results.
    vector : numpy.ndarray, optional
        Query with this vector (length = the store's dimension).
    bbox : tuple of float, optional
        ``(west, south, east, north)`` in lon/lat. Alone: query with the mean of the unit
        embeddings of the chips intersecting it, which are left out. With ``chip`` or ``vector``:
        search only among the chips intersecting it.
    k : int
        Number of results.
    exact : bool, optional
        Force exact search (True) or the ANN index (False); default: the index when the store has one
        and no bbox restricts the candidates.

    Returns
    -------
    geopandas.GeoDataFrame
        The store's rows of the matches (no embedding column), best first, with ``score`` (cosine
        similarity) and ``rank``.
    """
    fs = store if isinstance(store, FeatureStore) else FeatureStore(store)
    if (chip is not None and vector is not None) or (chip is None and vector is None and bbox is None):
        raise EoprepError("give exactly one of --chip or --vector, optionally with --bbox, or --bbox alone")
    table = fs.table()
    vectors = fs.vectors()
    units = unit_vectors(vectors)
    candidates = np.ones(len(table), dtype=bool)
    inside = _in_bbox(table, bbox) if bbox is not None else None
    if chip is not None:
        hits = np.flatnonzero(table["id"].to_numpy() == chip)
        if not len(hits):
            raise EoprepError(f"--chip: {chip} is not in {fs.path} ({len(table)} chips)")
        query = units[hits[0]]
        candidates[hits] = False
    elif vector is not None:
        if vector.shape != (units.shape[1],):
            raise EoprepError(f"--vector: has {vector.size} values; the store's embeddings have {units.shape[1]}")
        query = unit_vectors(vector[None])[0]
    else:
        if not inside.any():
            raise EoprepError(f"--bbox: no chip of {fs.path} intersects {list(bbox)}")
        query = unit_vectors(units[inside].mean(axis=0, keepdims=True))[0]
        candidates &= ~inside
        inside = None
    if inside is not None:
        candidates &= inside
    index_file = fs.path / ANN_FILE
    use_ann = (index_file.exists() and bbox is None) if exact is None else not exact
    if use_ann:
        if not index_file.exists():
            raise EoprepError(
                f"{fs.path} has no ANN index ({ANN_FILE}); it is built once output.ann_threshold "
                "rows are stored. Search exactly instead."
            )
        order, scores = _ann(index_file, query, k + int((~candidates).sum()))
        keep = candidates[order]
        order, scores = order[keep][:k], scores[keep][:k]
    else:
        all_scores = units @ query
        pool = np.flatnonzero(candidates)
        top = pool[np.argsort(-all_scores[pool], kind="stable")[:k]]
        order, scores = top, all_scores[top]
    result = table.iloc[order].reset_index(drop=True)
    result.insert(1, "score", scores.astype(np.float32))
    result.insert(2, "rank", np.arange(1, len(result) + 1))
    return result


def _in_bbox(table: gpd.GeoDataFrame, bbox: tuple[float, float, float, float]) -> np.ndarray:
    w, s, e, n = bbox
    if w >= e or s >= n:
        raise EoprepError(f"--bbox: {list(bbox)} is not WEST SOUTH EAST NORTH with west < east and south < north")
    return table.geometry.intersects(shapely.box(w, s, e, n)).to_numpy()


def _ann(path: Path, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.read_index(str(path))
    index.hnsw.efSearch = max(64, 2 * k)
    scores, order = index.search(query[None].astype(np.float32), k)
    valid = order[0] >= 0
    return order[0][valid], scores[0][valid]
