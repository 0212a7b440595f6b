"""PyTorch readers over the Zarr store and the TACO shards of one real run."""

from __future__ import annotations

import os
import shutil
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_spec
from eoprep.pipeline import run_pipeline

torch = pytest.importorskip("torch")
pytest.importorskip("tacotoolbox")

from torch.utils.data import DataLoader, default_collate, get_worker_info  # noqa: E402

from eoprep.readers import (  # noqa: E402
    ChipDataset,
    ChipIterableDataset,
    ChipSampler,
    ShardError,
    as_torchgeo,
    collate_chips,
    epoch_order,
    partition,
)
from eoprep.splits import read_splits, write_splits  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chips_out(stac_api, client, tmp_path_factory):
    """An output with 2-chip Zarr shards and small TACO shards (several of each)."""
    out = tmp_path_factory.mktemp("readers") / "out"
    spec = make_spec(out, output__format="taco", output__taco_shard_size="3MB", output__chips_per_shard=2)
    run_pipeline(spec, client=client, catalog_url=stac_api, say=lambda _m: None)
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.numpy().tobytes() == b.numpy().tobytes()


@pytest.mark.parametrize("url", [False, True])
def test_zarr_and_taco_datasets_return_the_same_samples(chips_out, url):
    base = f"file://{chips_out}" if url else str(chips_out)
    zarr_ds = ChipDataset(base, format="zarr")
    taco_ds = ChipDataset(f"{base}/taco")
    assert len(zarr_ds) == len(taco_ds) > 4
    by_id = {zarr_ds.records[i].id: i for i in range(len(zarr_ds))}
    for j in range(len(taco_ds)):
        t = taco_ds[j]
        z = zarr_ds[by_id[t["id"]]]
        assert (z["cell"], z["crs"]) == (t["cell"], t["crs"]) and torch.equal(z["transform"], t["transform"])
        for g in ("s1", "s2"):
            assert _same(z["pixels"][g], t["pixels"][g]) and torch.equal(z["datetime"][g], t["datetime"][g])
    sample = zarr_ds[0]
    assert sample["pixels"]["s2"].shape == (8, 7, 128, 128) and sample["pixels"]["s2"].dtype == torch.uint16
    assert sample["pixels"]["s1"].dtype == torch.float32 and sample["datetime"]["s2"].dtype == torch.int64


def test_band_selection_transform_and_features(chips_out, tmp_path):
    ids = [r.id for r in ChipDataset(chips_out).records]
    store = tmp_path / "features.parquet"
    vectors = np.arange(len(ids) * 4, dtype=np.float32).reshape(-1, 4)
    pq.write_table(pa.table({"id": ids, "embedding": vectors.tolist()}), store)

    def to_float(sample):
        sample["image"] = sample["pixels"]["s2"].to(torch.float32) / 10000
        return sample

    for fmt in ("zarr", "taco"):
        ds = ChipDataset(
            chips_out, format=fmt, groups=["s2"], bands={"s2": ["B08", "B04"]}, features=str(store), transform=to_float
        )
        full = ChipDataset(chips_out, format=fmt)
        i = 2
        s, f = ds[i], full[i]
        assert list(s["pixels"]) == ["s2"] and ds.bands == {"s2": ("B08", "B04")}
        np.testing.assert_array_equal(s["pixels"]["s2"].numpy(), f["pixels"]["s2"].numpy()[:, [3, 2]])
        assert s["image"].dtype == torch.float32
        np.testing.assert_array_equal(s["embedding"].numpy(), vectors[ids.index(s["id"])])
    with pytest.raises(Exception, match=r"bands\['s2'\]: \['B99'\] not in the output"):
        ChipDataset(chips_out, bands={"s2": ["B99"]})


def test_partition_and_epoch_order_tile_every_epoch():
    shards = [f"shard{i // 3}" for i in range(41)]
    for epoch in range(3):
        order = epoch_order(shards, seed=5, epoch=epoch, shuffle=True)
        assert sorted(order) == list(range(41))
        # chips of one shard stay together, so each worker touches few shards
        runs = [shards[i] for i in order]
        assert sum(a != b for a, b in zip(runs, runs[1:], strict=False)) == len(set(shards)) - 1
        for world, workers in [(1, 1), (2, 3), (3, 2), (4, 4)]:
            got = [
                order[partition(41, world, r)][partition(len(order[partition(41, world, r)]), workers, w)]
                for r in range(world)
                for w in range(workers)
            ]
            flat = np.concatenate(got)
            assert sorted(flat) == list(range(41))
            sizes = [len(g) for g in got]
            assert max(sizes) - min(sizes) <= 1
    a = epoch_order(shards, seed=5, epoch=0, shuffle=True)
    assert np.array_equal(a, epoch_order(shards, seed=5, epoch=0, shuffle=True))
    assert not np.array_equal(a, epoch_order(shards, seed=5, epoch=1, shuffle=True))


@pytest.mark.parametrize("fmt", ["zarr", "taco"])
def test_dataloader_workers_and_ranks_read_each_chip_once_per_epoch(chips_out, fmt):
    all_ids = sorted(r.id for r in ChipDataset(chips_out, format=fmt).records)
    orders = {}
    for epoch in (0, 1):
        seen = []
        for rank in range(2):
            ds = ChipIterableDataset(chips_out, format=fmt, groups=["s1"], seed=11, rank=rank, world_size=2)
            ds.set_epoch(epoch)
            loader = DataLoader(ds, batch_size=2, num_workers=2)
            ids = [i for batch in loader for i in batch["id"]]
            assert abs(len(ids) - len(all_ids) / 2) <= 1
            seen += ids
        assert sorted(seen) == all_ids and not [k for k, n in Counter(seen).items() if n > 1]
        orders[epoch] = [ds.plan(w, 2) for w in range(2)]
    assert orders[0] != orders[1]
    sampler = ChipSampler(ChipDataset(chips_out, format=fmt), seed=11, rank=1, world_size=2)
    other = ChipSampler(ChipDataset(chips_out, format=fmt), seed=11, rank=0, world_size=2)
    assert sorted([*sampler, *other]) == list(range(len(all_ids)))


def _leaves(batch):
    if isinstance(batch, dict):
        return [leaf for value in batch.values() for leaf in _leaves(value)]
    return [batch]


@pytest.mark.parametrize("fmt", ["zarr", "taco"])
def test_collate_chips_matches_default_collate_in_one_shared_buffer(chips_out, fmt):
    def loader(collate_fn):
        ds = ChipIterableDataset(chips_out, format=fmt, shuffle=False)
        return DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_fn)

    packed, default = list(loader(collate_chips)), list(loader(None))
    assert len(packed) == len(default) > 2
    for ours, theirs in zip(packed, default, strict=True):
        assert ours.keys() == theirs.keys() and ours["pixels"].keys() == theirs["pixels"].keys()
        assert ours["id"] == theirs["id"] and ours["crs"] == theirs["crs"]
        mine, reference = _leaves(ours), _leaves(theirs)
        for a, b in zip(mine, reference, strict=True):
            if isinstance(b, torch.Tensor):
                assert a.shape == b.shape and _same(a, b)
            else:
                assert a == b
        tensors = [t for t in mine if isinstance(t, torch.Tensor)]
        assert len(tensors) >= 9 and len({t.untyped_storage().data_ptr() for t in tensors}) == 1
        assert len({t.untyped_storage().data_ptr() for t in reference if isinstance(t, torch.Tensor)}) > 1
    samples = [ChipDataset(chips_out, format=fmt)[i] for i in range(3)]
    in_process, reference = collate_chips(samples), default_collate(samples)
    assert in_process["pixels"]["s2"].shape == (3, 8, 7, 128, 128)
    for a, b in zip(_leaves(in_process), _leaves(reference), strict=True):
        assert _same(a, b) if isinstance(b, torch.Tensor) else a == b


def _collate_noting_segment(samples):
    """`collate_chips`, plus the inode of the shared-memory segment the worker built the batch in."""
    batch = collate_chips(samples)
    fd, _size = batch["pixels"]["s2"].untyped_storage()._share_fd_cpu_()
    batch["segment"] = (get_worker_info().id, os.fstat(fd).st_ino)
    return batch


def test_workers_refill_a_batch_buffer_only_once_the_main_process_dropped_it(chips_out):
    ds = ChipIterableDataset(chips_out, format="zarr", shuffle=False)
    expected = {s["id"]: s for s in ChipIterableDataset(chips_out, format="zarr", shuffle=False)}
    loader = DataLoader(ds, batch_size=1, num_workers=2, persistent_workers=True, collate_fn=_collate_noting_segment)
    kept, segments, batches = [], Counter(), 0

    def check(batch):
        sample = expected[batch["id"][0]]
        assert all(_same(batch["pixels"][g][0], sample["pixels"][g]) for g in ("s1", "s2"))
        assert torch.equal(batch["datetime"]["s2"][0], sample["datetime"]["s2"])

    for _epoch in range(4):
        for batch in loader:
            check(batch)
            segments[batch["segment"]] += 1
            batches += 1
            if batches % 5 == 0:
                kept.append(batch)  # held to the end: its buffer must not be refilled meanwhile
    for batch in kept:
        check(batch)
    per_worker = Counter(worker for worker, _inode in segments)
    assert batches >= 20 and set(per_worker) == {0, 1}
    assert all(n <= 6 + len(kept) for n in per_worker.values())  # a buffer of its own for each batch still held
    assert max(segments.values()) >= 3  # the other batches share a few buffers


def test_a_released_buffer_is_flagged_to_the_worker_that_leased_it_even_when_its_pid_comes_back():
    from eoprep.readers import _collate

    pid = 4_000_000 + os.getpid()  # a worker pid other than ours
    old, new = torch.zeros(6, dtype=torch.int32), torch.zeros(6, dtype=torch.int32)
    held = _collate._received({"x": torch.ones(3)}, (pid, 2, old))
    assert old.tolist() == [0] * 6  # still held here
    again = _collate._received({"x": torch.ones(3)}, (pid, 2, new))  # a new worker under the same pid
    del held
    _collate._received({"x": torch.ones(3)}, (pid, 0, None))
    assert old[2] == 1 and new[2] == 0  # the dropped batch frees the old worker's buffer, not the new one's
    del again
    _collate._received({"x": torch.ones(3)}, (pid, 1, None))
    assert new[2] == 1 and new[0] == 1 and new[1] == 0


def test_an_output_directory_whose_name_ends_in_taco_is_an_output_not_its_taco_folder(chips_out, tmp_path):
    out = tmp_path / "demo-taco"
    shutil.copytree(chips_out, out)
    ids = sorted(r.id for r in ChipDataset(chips_out, format="taco").records)
    for path, fmt in ((out, "taco"), (out, "auto"), (out / "taco", "auto"), (f"file://{out}", "taco")):
        assert sorted(r.id for r in ChipDataset(str(path), format=fmt).records) == ids


def test_collate_chips_names_the_field_that_does_not_stack():
    a = {"pixels": {"s2": torch.zeros(2, 4, 4)}, "id": "a"}
    b = {"pixels": {"s2": torch.zeros(2, 4, 5)}, "id": "b"}
    with pytest.raises(ValueError, match=r"shape or dtype of 'pixels.s2'"):
        collate_chips([a, b])
    with pytest.raises(ValueError, match=r"keys of 'pixels'"):
        collate_chips([a, {"pixels": {"s1": torch.zeros(2, 4, 4)}, "id": "c"}])
    batch = collate_chips(
        [{"x": np.float32(0.5), "n": 3, "ok": True, "id": "a"}, {"x": 1.5, "n": 4, "ok": False, "id": "b"}]
    )
    assert batch["x"].dtype == torch.float64 and batch["x"].tolist() == [0.5, 1.5]
    assert batch["n"].tolist() == [3, 4] and batch["ok"].tolist() == [True, False] and batch["id"] == ["a", "b"]


def _big_buffer_from_heap(sample):
    """Whether glibc serves a 48 MB buffer from its heap, where freed memory is reused, not from a fresh mmap.

    Read from the chunk header in front of the buffer: glibc flags chunks it mapped on their own (IS_MMAPPED).
    """
    import ctypes

    buffer = torch.empty(6 * 2**20, dtype=torch.float64)  # kept alive while its header is read
    sample["from_heap"] = not ctypes.c_size_t.from_address(buffer.data_ptr() - 8).value & 2
    return sample


def _in_process_sample_from_heap(out: str) -> bool:
    ds = ChipIterableDataset(out, groups=["s1"], transform=_big_buffer_from_heap)
    return bool(any(next(iter(DataLoader(ds, batch_size=2, num_workers=0)))["from_heap"]))


def test_dataloader_workers_keep_chip_buffers_on_the_heap(chips_out):
    """Workers raise glibc's mmap threshold (above its 32 MB dynamic limit), so freed chip-sized buffers are
    reused instead of each one being a fresh mapping whose pages fault in again; the main process is left alone.

    The main-process side runs in a fresh process: in a long pytest process the heap may already hold a
    free block big enough for the buffer, whatever the thresholds."""
    import multiprocessing

    ds = ChipIterableDataset(chips_out, groups=["s1"], transform=_big_buffer_from_heap)
    assert all(v for batch in DataLoader(ds, batch_size=2, num_workers=2) for v in batch["from_heap"])
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert not pool.apply(_in_process_sample_from_heap, (str(chips_out),))


def test_geographic_split_filters_chips(chips_out):
    write_splits(chips_out, block_size=1, buffer=0, fractions={"train": 0.5, "test": 0.5}, seed=2)
    table = read_splits(chips_out)
    parts = {}
    for split in ("train", "test"):
        ds = ChipDataset(chips_out, format="taco", split=split)
        parts[split] = {r.cell for r in ds.records}
        assert parts[split] <= set(table.loc[table["split"] == split, "cell"])
    assert parts["train"] and parts["test"] and not parts["train"] & parts["test"]
    assert len(ChipDataset(chips_out, split="train")) + len(ChipDataset(chips_out, split="test")) == len(
        ChipDataset(chips_out)
    )


@pytest.fixture
def damaged(chips_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(chips_out, out)
    return out


def test_missing_or_truncated_shards_raise_naming_the_shard(damaged):
    zarr_ds = ChipDataset(damaged, format="zarr")
    (damaged / "chips.zarr" / "s1" / "pixels" / "c" / "1" / "0" / "0" / "0" / "0").unlink()
    with pytest.raises(ShardError, match=r"shard .*chips.zarr/s1/pixels/c/1/0/0/0/0 is missing"):
        zarr_ds[2]
    s2_shard = damaged / "chips.zarr" / "s2" / "pixels" / "c" / "2" / "0" / "0" / "0" / "0"
    s2_shard.write_bytes(s2_shard.read_bytes()[:-100])
    with pytest.raises(ShardError, match=r"chips.zarr/s2/pixels/c/2/0/0/0/0 does not decode"):
        ChipDataset(damaged, format="zarr", groups=["s2"])[4]

    shards = sorted((damaged / "taco").glob("*.tacozip"))
    shards[0].unlink()
    shards[1].write_bytes(shards[1].read_bytes()[: shards[1].stat().st_size // 2])
    taco_ds = ChipDataset(damaged, format="taco")
    first = next(i for i, r in enumerate(taco_ds.records) if r.shard == shards[0].name)
    with pytest.raises(ShardError, match=rf"shard .*{shards[0].name} is missing"):
        taco_ds[first]
    second = next(i for i, r in enumerate(taco_ds.records) if r.shard == shards[1].name)
    with pytest.raises(ShardError, match=rf"shard .*{shards[1].name} is truncated"):
        taco_ds[second]


def test_bad_shards_are_skipped_with_a_warning_only_when_asked(damaged):
    shards = sorted((damaged / "taco").glob("*.tacozip"))
    payload = bytearray(shards[0].read_bytes())
    payload[400:408] = b"\xff" * 8  # inside the first payload: same size, wrong bytes
    shards[0].write_bytes(bytes(payload))
    full = ChipDataset(damaged, format="taco")
    with pytest.raises(ShardError, match=rf"{shards[0].name} is corrupt"):
        [full[i] for i in range(len(full))]
    shards[1].unlink()
    with pytest.warns(UserWarning, match=rf"{shards[1].name} is missing"):
        kept = ChipDataset(damaged, format="taco", on_error="skip")
    assert len(kept) == len(full) - sum(r.shard == shards[1].name for r in full.records)
    stream = ChipIterableDataset(damaged, format="taco", shuffle=False, on_error="skip")
    with pytest.warns(UserWarning, match="skipping the rest of a shard"):
        ids = [s["id"] for s in stream]
    bad = {r.id for r in full.records if r.shard in (shards[0].name, shards[1].name)}
    assert set(ids) == {r.id for r in full.records} - bad


def test_torchgeo_adapter(chips_out):
    pytest.importorskip("torchgeo")
    from torchgeo.datasets import NonGeoDataset

    ds = as_torchgeo(ChipDataset(chips_out, groups=["s2"], bands={"s2": ["B04", "B08"]}))
    assert isinstance(ds, NonGeoDataset) and len(ds) > 0
    assert ds[0]["image"].shape == (16, 128, 128) and ds[0]["image"].dtype == torch.float32
