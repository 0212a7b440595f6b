"""Geographic train/val/test splits by blocks of grid cells, with a buffer so no split touches another.

Neighbouring cells share most of their landscape, so a random chip split leaks: a model is validated
on the next field over from its training data. Here whole blocks of ``block_size × block_size`` grid
cells go to one split, drawn from a hash of ``(seed, block)``, so a block's split never changes when
an output grows. Then every cell closer than ``buffer`` cells to a cell of a higher-priority split
(test > val > train) becomes ``"buffer"`` and is left out of all three. The table is stored as
``OUT/splits.parquet`` (columns ``cell``, ``row``, ``col``, ``block_row``, ``block_col``, ``split``)
with the parameters in its metadata, and the readers filter chips by it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from eoprep.errors import EoprepError
from eoprep.grid import GlobalGrid

__all__ = ["BUFFER", "SPLITS_FILE", "assign_splits", "read_splits", "write_splits"]

SPLITS_FILE = "splits.parquet"
BUFFER = "buffer"
_DEFAULT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def _block_draw(seed: int, block_row: int, block_col: int) -> float:
    """A uniform number in [0, 1) that depends only on the seed and the block (stable across runs)."""
    digest = hashlib.sha256(f"{seed}:{block_row}:{block_col}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(
    cells: Iterable[str],
    grid: GlobalGrid,
    *,
    fractions: Mapping[str, float] | None = None,
    block_size: int = 8,
    buffer: int = 1,
    seed: int = 0,
) -> pd.DataFrame:
    """Assign grid cells to splits by blocks, with a buffer between splits.

    Parameters
    ----------
    cells
        Cell ids of the grid (duplicates are ignored).
    grid
        The grid the ids belong to.
    fractions
        Split name → expected share of blocks. Order sets priority: a cell within ``buffer`` cells
        of a cell of a later-listed split goes to the buffer. Default ``train 0.8, val 0.1, test 0.1``.
    block_size
        Block edge in cells.
    buffer
        Minimum gap, in cells, between cells of different splits; 0 keeps every cell.
    seed
        Selects the draw; the same seed gives the same table.

    Returns
    -------
    pandas.DataFrame
        One row per cell: ``cell``, ``row``, ``col``, ``block_row``, ``block_col``, ``split``.
    """
    fractions = dict(fractions or _DEFAULT_FRACTIONS)
    if not fractions or any(v < 0 for v in fractions.values()) or sum(fractions.values()) <= 0:
        raise EoprepError(f"fractions must be non-negative with a positive sum, got {fractions}")
    if BUFFER in fractions:
        raise EoprepError(f"{BUFFER!r} is reserved for the cells between splits; rename that split")
    if block_size < 1 or buffer < 0:
        raise EoprepError(f"block_size must be >= 1 and buffer >= 0, got {block_size}, {buffer}")
    names = list(fractions)
    edges = np.cumsum([fractions[n] for n in names]) / sum(fractions.values())
    parsed = [grid.cell(c) for c in dict.fromkeys(cells)]
    rows = np.array([c.row for c in parsed], dtype=np.int64)
    cols = np.array([c.col for c in parsed], dtype=np.int64)
    block_rows, block_cols = rows // block_size, cols // block_size
    draws = np.array([_block_draw(seed, r, c) for r, c in zip(block_rows, block_cols, strict=True)])
    split_of = np.minimum(np.searchsorted(edges, draws, side="right"), len(names) - 1)
    assigned = split_of.copy()
    if buffer > 0 and len(parsed):
        assigned = _apply_buffer(parsed, split_of, buffer, len(names))
    labels = np.array([*names, BUFFER], dtype=object)
    return pd.DataFrame(
        {
            "cell": [c.id for c in parsed],
            "row": rows,
            "col": cols,
            "block_row": block_rows,
            "block_col": block_cols,
            "split": labels[assigned],
        }
    )


def _apply_buffer(parsed: list[Any], split_of: np.ndarray, buffer: int, buffer_index: int) -> np.ndarray:
    """Move cells within ``buffer`` cells of a cell of a later-listed split to ``buffer_index``."""
    bounds = np.array([c.bounds for c in parsed])
    tree = shapely.STRtree(shapely.box(*bounds.T))
    width = bounds[:, 2] - bounds[:, 0]
    height = bounds[:, 3] - bounds[:, 1]
    # A cell g whole cells away intersects a box grown by (buffer - 0.5) cells exactly when g < buffer.
    grow = buffer - 0.5
    grown = shapely.box(
        bounds[:, 0] - grow * width,
        bounds[:, 1] - grow * height,
        bounds[:, 2] + grow * width,
        bounds[:, 3] + grow * height,
    )
    src, dst = tree.query(grown, predicate="intersects")
    out = split_of.copy()
    outranked = split_of[dst] > split_of[src]
    out[np.unique(src[outranked])] = buffer_index
    return out


def write_splits(
    out_dir: str | Path,
    *,
    fractions: Mapping[str, float] | None = None,
    block_size: int = 8,
    buffer: int = 1,
    seed: int = 0,
) -> Path:
    """Compute the splits of an output's cells and store them as ``OUT/splits.parquet``.

    The cells come from ``OUT/index.parquet``, the grid from the Zarr store's ``eoprep:grid``
    attribute; see `assign_splits` for the parameters. The file is replaced atomically.
    """
    import zarr

    from eoprep.sinks import CHIPS_STORE, atomic_write, read_index

    out = Path(out_dir)
    attrs = dict(zarr.open_group(out / CHIPS_STORE, mode="r").attrs)
    if "eoprep:grid" not in attrs:
        raise EoprepError(f"{out / CHIPS_STORE}: no eoprep:grid attribute; is this an eoprep output?")
    grid = GlobalGrid(**attrs["eoprep:grid"])
    fractions = dict(fractions or _DEFAULT_FRACTIONS)
    table = assign_splits(
        read_index(out)["cell"], grid, fractions=fractions, block_size=block_size, buffer=buffer, seed=seed
    )
    params = {
        "fractions": fractions,
        "block_size": block_size,
        "buffer": buffer,
        "seed": seed,
        "grid": attrs["eoprep:grid"],
    }
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.replace_schema_metadata(
        {**(arrow.schema.metadata or {}), b"eoprep:splits": json.dumps(params).encode()}
    )
    path = out / SPLITS_FILE
    atomic_write(path, lambda p: pq.write_table(arrow, p))
    return path


def read_splits(path: str | Path, *, storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """The splits table of an output directory (or of a ``splits.parquet`` path / fsspec URL)."""
    import fsspec

    url = str(path)
    if not url.endswith(".parquet"):
        url = url.rstrip("/") + "/" + SPLITS_FILE
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            return pq.read_table(f).to_pandas()
    except FileNotFoundError:
        raise EoprepError(f"{url} not found: write the splits first with eoprep.splits.write_splits(OUT)") from None
