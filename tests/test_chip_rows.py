"""Side-by-side chips read as one row window give exactly the pixels of chip-by-chip reads."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pystac
import pytest

from conftest import TEST_BBOX, make_spec
from eoprep.chips import _chip_rows, build_chip, collection_layout, plan_chips, read_chip_rows
from eoprep.grid import GlobalGrid


@pytest.fixture(scope="module")
def plans(demo_archive, tmp_path_factory):
    spec = make_spec(tmp_path_factory.mktemp("rows"))
    ids = {c.id: c.key for c in spec.source.collections}
    items: dict[str, list[pystac.Item]] = {key: [] for key in ids.values()}
    for item in demo_archive.items:
        if item["collection"] in ids:
            items[ids[item["collection"]]].append(pystac.Item.from_dict(item))
    layouts = {c.key: collection_layout(spec, c, items[c.key]) for c in spec.source.collections}
    grid = GlobalGrid(cell_size=spec.grid.cell_size, pixel_size=spec.grid.pixel_size)
    planned, _ = plan_chips(spec, grid, grid.cells_in_bbox(tuple(TEST_BBOX)), items, layouts)
    return planned, layouts


@pytest.mark.parametrize("engine", ["odc-stac", "rasterio", "stackstac"])
def test_row_reads_equal_chip_reads(plans, engine):
    planned, layouts = plans
    rows = _chip_rows(planned)
    assert rows and sum(len(r) for r in rows) > len(rows)
    for layout in layouts.values():
        got = read_chip_rows(planned, layout, engine=engine)
        assert set(got) == {p.id for row in rows for p in row}
        buffer = None  # one buffer for every chip, as a shard task builds them
        for plan in planned:
            if plan.id in got:
                chip = got[plan.id].build(buffer)
                assert buffer is None or chip is buffer
                want, _ = build_chip(plan, layout, engine=engine, retries=0, backoff=0)
                assert chip.dtype == want.dtype
                np.testing.assert_array_equal(chip, want)
                buffer = chip


def test_rows_hold_only_side_by_side_chips_of_one_crs(plans):
    planned, _ = plans
    for row in _chip_rows(planned):
        extent = row[0].grid.size * row[0].grid.pixel_size
        assert len({p.grid.crs for p in row}) == 1
        assert all(abs(b.grid.x0 - a.grid.x0 - extent) <= extent / 4 for a, b in zip(row, row[1:], strict=False))
        assert max(p.grid.y0 for p in row) - min(p.grid.y0 for p in row) <= extent / 4


def test_a_failing_row_is_left_to_chip_reads(plans):
    planned, layouts = plans
    layout = layouts["s2"]
    broken = [_with_missing_file(p, layout.key) for p in planned]
    assert read_chip_rows(broken, layout, engine="rasterio") == {}


def _with_missing_file(plan, key):
    slots = []
    for slot in plan.slots[key]:
        items = tuple(
            {**it, "assets": {k: {**a, "href": a["href"] + ".missing"} for k, a in it["assets"].items()}}
            for it in slot.items
        )
        slots.append(replace(slot, items=items))
    return replace(plan, slots={**plan.slots, key: slots})


def test_row_reads_copy_reused_slots_from_the_stored_chip(plans):
    planned, layouts = plans
    layout = layouts["s2"]
    reusing, stored = [], {}
    for plan in planned:
        full, _ = build_chip(plan, layout, engine="rasterio", retries=0, backoff=0)
        marked = full.copy()
        marked[:3] += 1  # stored slots differ from what a read gives: copies are told apart from reads
        stored[plan.id] = marked
        reusing.append(replace(plan, reuse={layout.key: 3}))
    got = read_chip_rows(reusing, layout, engine="rasterio", stored=stored)
    assert got
    for plan in reusing:
        if plan.id in got:
            dirty = np.full_like(stored[plan.id], 7)  # a reused buffer still holding another chip
            chip = got[plan.id].build(dirty)
            want, _ = build_chip(plan, layout, engine="rasterio", retries=0, backoff=0, stored=stored[plan.id])
            np.testing.assert_array_equal(chip, want)
            np.testing.assert_array_equal(chip[:3], stored[plan.id][:3])
