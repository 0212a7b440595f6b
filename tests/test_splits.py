"""Geographic splits: whole blocks per split, a buffer between splits, deterministic and stable."""

from __future__ import annotations

import numpy as np
import pytest
import shapely

from eoprep.grid import GlobalGrid
from eoprep.splits import BUFFER, assign_splits

GRID = GlobalGrid(cell_size=1280, pixel_size=10)


@pytest.fixture(scope="module")
def cells() -> list[str]:
    return [c.id for c in GRID.cells_in_bbox((8.9, 45.3, 9.3, 45.6))]


def _touching_pairs(table, grid, gap):
    """Pairs of cells of different (non-buffer) splits fewer than ``gap`` cells apart."""
    kept = table[table["split"] != BUFFER].reset_index(drop=True)
    bounds = np.array([grid.cell(c).bounds for c in kept["cell"]])
    w, h = bounds[:, 2] - bounds[:, 0], bounds[:, 3] - bounds[:, 1]
    g = gap - 0.5
    grown = shapely.box(bounds[:, 0] - g * w, bounds[:, 1] - g * h, bounds[:, 2] + g * w, bounds[:, 3] + g * h)
    a, b = shapely.STRtree(shapely.box(*bounds.T)).query(grown, predicate="intersects")
    split = kept["split"].to_numpy()
    return [(kept["cell"][i], kept["cell"][j]) for i, j in zip(a, b, strict=True) if split[i] != split[j]]


@pytest.mark.parametrize("buffer", [1, 2])
def test_no_cell_touches_a_cell_of_another_split(cells, buffer):
    table = assign_splits(cells, GRID, block_size=4, buffer=buffer, seed=1)
    assert len(cells) > 500 and table["cell"].is_unique and len(table) == len(cells)
    assert set(table["split"]) == {"train", "val", "test", BUFFER}
    assert _touching_pairs(table, GRID, gap=buffer) == []
    # Buffer cells exist only where blocks of different splits meet, and are a minority.
    assert 0 < (table["split"] == BUFFER).mean() < 0.5


def test_a_block_never_feeds_two_splits(cells):
    table = assign_splits(cells, GRID, block_size=4, buffer=1, seed=1)
    kept = table[table["split"] != BUFFER]
    assert (kept.groupby(["block_row", "block_col"])["split"].nunique() == 1).all()
    without_buffer = assign_splits(cells, GRID, block_size=4, buffer=0, seed=1)
    assert (without_buffer.groupby(["block_row", "block_col"])["split"].nunique() == 1).all()
    # Without a buffer, neighbouring blocks of different splits do touch: the buffer is what separates them.
    assert _touching_pairs(without_buffer, GRID, gap=1)


def test_splits_are_deterministic_and_stable_when_the_output_grows(cells):
    a = assign_splits(cells, GRID, block_size=4, seed=7)
    b = assign_splits(list(reversed(cells)), GRID, block_size=4, seed=7).set_index("cell").loc[a["cell"]]
    assert (a["split"].to_numpy() == b["split"].to_numpy()).all()
    more = [c.id for c in GRID.cells_in_bbox((8.9, 45.3, 9.5, 45.6))]
    grown = assign_splits(more, GRID, block_size=4, buffer=0, seed=7).set_index("cell")
    base = assign_splits(cells, GRID, block_size=4, buffer=0, seed=7).set_index("cell")
    assert (grown.loc[base.index, "split"] == base["split"]).all()
    other = assign_splits(cells, GRID, block_size=4, seed=8)
    assert (other["split"] != a["split"]).any()


def test_fractions_set_the_share_of_blocks(cells):
    table = assign_splits(cells, GRID, block_size=2, buffer=0, fractions={"train": 0.6, "test": 0.4}, seed=3)
    blocks = table.drop_duplicates(["block_row", "block_col"])
    assert set(blocks["split"]) == {"train", "test"}
    assert 0.5 < (blocks["split"] == "train").mean() < 0.7
