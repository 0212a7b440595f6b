"""Nightly refresh: only new or changed inputs are fetched, and faults never cost a chip.

Every scenario ends by comparing the output with a clean run over the same inputs: same chip set,
same bytes of pixel data.
"""

from __future__ import annotations

import copy
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
import yaml

from conftest import make_spec
from eoprep.errors import EoprepError
from eoprep.ops import CronSchedule, OutputLock
from eoprep.pipeline import run_pipeline
from eoprep.runtime import dask_client

pytestmark = pytest.mark.slow

S2 = "demo-sentinel-2-l2a"


def _quiet(_msg: str) -> None:
    pass


def _collection(archive, stac_server, cid: str, n: int) -> list[dict]:
    """Put the first ``n`` S2 scenes into a collection of this test's own; returns all S2 items re-homed."""
    coll = copy.deepcopy(next(c for c in archive.collections if c["id"] == S2))
    coll["id"] = cid
    items = []
    for item in (i for i in archive.items if i["collection"] == S2):
        item = copy.deepcopy(item)
        item["collection"] = cid
        items.append(item)
    stac_server.load([coll], items[:n])
    return items


def _spec(out: Path, cid: str, **changes):
    return make_spec(out, source__collections=[{"id": cid, "name": "s2", "bands": ["B04", "B08", "SCL"]}], **changes)


def _pixels(out: Path) -> tuple[list[str], np.ndarray]:
    ds = xr.open_zarr(out / "chips.zarr", group="s2")
    ids = [str(v) for v in ds["chip"].values]
    order = np.argsort(ids)
    assert bool(ds["written"].all())
    return [ids[i] for i in order], ds["pixels"].values[order]


def _assert_same_output(a: Path, b: Path) -> None:
    ids_a, px_a = _pixels(a)
    ids_b, px_b = _pixels(b)
    assert ids_a == ids_b
    np.testing.assert_array_equal(px_a, px_b)
    assert _stac_items(a) == _stac_items(b)


def _stac_items(out: Path) -> dict[str, dict]:
    """The output's STAC items by file name, without the spec hash (the two specs differ in their output path)."""
    items = {}
    for path in sorted((out / "stac" / "items").glob("*.json")):
        item = json.loads(path.read_text())
        del item["properties"]["eoprep:spec_hash"]
        items[path.name] = item
    return items


def test_refresh_appends_a_new_date_and_then_has_nothing_to_do(demo_archive, stac_server, client, tmp_path):
    items = _collection(demo_archive, stac_server, "refresh-new-date", 6)
    out = tmp_path / "out"
    first = run_pipeline(_spec(out, "refresh-new-date"), client=client, catalog_url=stac_server.url, say=_quiet)
    assert first.chips_written == first.chips_planned

    stac_server.load([], items[:7])
    messages: list[str] = []
    second = run_pipeline(
        _spec(out, "refresh-new-date"), client=client, catalog_url=stac_server.url, say=messages.append
    )
    assert second.chips_updated == second.chips_written == first.chips_written
    ds = xr.open_zarr(out / "chips.zarr", group="s2")
    assert (ds["datetime"].notnull().sum("time") == 7).all()

    clean = tmp_path / "clean"
    run_pipeline(_spec(clean, "refresh-new-date"), client=client, catalog_url=stac_server.url, say=_quiet)
    _assert_same_output(out, clean)

    third = run_pipeline(
        _spec(out, "refresh-new-date"), client=client, catalog_url=stac_server.url, say=messages.append
    )
    assert third.chips_written == 0 and third.bytes_written == 0
    assert any(m.startswith("nothing new") for m in messages)
    runs = sorted((out / "runs").glob("*.json"))
    assert len(runs) == 3
    manifest = json.loads(runs[-1].read_text())
    assert len(manifest["input_items"]["s2"]) == 7 and manifest["watermark"]


def test_taco_shards_holding_rewritten_chips_are_replaced(demo_archive, stac_server, client, tmp_path):
    import tacoreader

    from eoprep.readers import ChipDataset

    items = _collection(demo_archive, stac_server, "refresh-taco", 6)
    out = tmp_path / "out"

    def run():
        spec = _spec(out, "refresh-taco", output__format="taco", output__taco_shard_size="2MB")
        return run_pipeline(spec, client=client, catalog_url=stac_server.url, say=_quiet)

    run()
    old_shards = set((out / "taco").glob("*.tacozip"))
    stac_server.load([], items[:7])
    second = run()  # whole-series chips: the new date rewrites every chip under its old id
    assert second.chips_updated == second.chips_written > 0
    assert not old_shards & set((out / "taco").glob("*.tacozip"))
    zarr_ds, taco_ds = ChipDataset(out, format="zarr"), ChipDataset(out, format="taco")
    by_id = {taco_ds.records[j].id: j for j in range(len(taco_ds))}
    assert sorted(by_id) == sorted(r.id for r in zarr_ds.records)
    for i in range(len(zarr_ds)):
        z, t = zarr_ds[i], taco_ds[by_id[zarr_ds.records[i].id]]
        assert z["pixels"]["s2"].numpy().tobytes() == t["pixels"]["s2"].numpy().tobytes()
    ids = tacoreader.load(str(out / "taco" / ".tacocat")).data.to_arrow().column("id").to_pylist()
    assert len(ids) == len(set(ids)) == len(zarr_ds)


def test_a_new_date_under_co_registration_gives_what_a_clean_run_gives(demo_archive, stac_server, client, tmp_path):
    """Stored slots are already corrected against their run's reference; a refresh must not correct them twice."""
    items = _collection(demo_archive, stac_server, "refresh-align", 6)
    out = tmp_path / "out"
    align = {"reference": "s2", "bands": {"s2": ["B04", "B08"]}}
    run_pipeline(_spec(out, "refresh-align", align=align), client=client, catalog_url=stac_server.url, say=_quiet)
    stac_server.load([], items[:7])
    again = run_pipeline(
        _spec(out, "refresh-align", align=align), client=client, catalog_url=stac_server.url, say=_quiet
    )
    assert again.chips_updated == again.chips_planned
    clean = tmp_path / "clean"
    run_pipeline(_spec(clean, "refresh-align", align=align), client=client, catalog_url=stac_server.url, say=_quiet)
    _assert_same_output(out, clean)


def test_a_reprocessed_scene_replaces_the_chips_it_touches(demo_archive, stac_server, client, tmp_path):
    items = _collection(demo_archive, stac_server, "refresh-changed", 4)
    out = tmp_path / "out"
    run_pipeline(_spec(out, "refresh-changed"), client=client, catalog_url=stac_server.url, say=_quiet)
    before = _pixels(out)[1]

    changed = copy.deepcopy(items[1])
    src = Path(changed["assets"]["B04"]["href"].removeprefix("file://"))
    new_cog = tmp_path / "B04-reprocessed.tif"
    with rasterio.open(src) as ds:
        profile, data = ds.profile, ds.read(1)
    with rasterio.open(new_cog, "w", **profile) as dst:
        dst.write(np.where(data > 0, data + 7, 0).astype(data.dtype), 1)
    changed["assets"]["B04"]["href"] = new_cog.as_uri()
    changed["properties"]["updated"] = "2024-09-01T00:00:00Z"
    stac_server.load([], [changed])

    summary = run_pipeline(_spec(out, "refresh-changed"), client=client, catalog_url=stac_server.url, say=_quiet)
    assert summary.chips_updated == summary.chips_planned
    after = _pixels(out)[1]
    band = 0
    diff = after[:, 1, band].astype(int) - before[:, 1, band].astype(int)
    assert set(np.unique(diff[before[:, 1, band] > 0])) == {7}
    np.testing.assert_array_equal(after[:, [0, 2, 3]], before[:, [0, 2, 3]])
    clean = tmp_path / "clean"
    run_pipeline(_spec(clean, "refresh-changed"), client=client, catalog_url=stac_server.url, say=_quiet)
    _assert_same_output(out, clean)


def test_unfinished_chips_with_a_gap_between_them_in_one_shard_are_rewritten(stac_api, client, tmp_path):
    import zarr

    out = tmp_path / "out"
    run_pipeline(make_spec(out), client=client, catalog_url=stac_api, say=_quiet)
    root = zarr.open_group(out / "chips.zarr", mode="r+")
    before = {key: root[f"{key}/pixels"][:] for key in ("s2", "s1")}
    for key in ("s2", "s1"):  # as a run killed between recording chips 0 and 2 and the rest leaves them
        written = root[f"{key}/written"][:]
        written[[0, 2]] = False
        root[f"{key}/written"][:] = written
    summary = run_pipeline(make_spec(out), client=client, catalog_url=stac_api, say=_quiet)
    assert (summary.chips_updated, summary.chips_written, summary.skipped) == (2, 2, [])
    for key, pixels in before.items():
        np.testing.assert_array_equal(root[f"{key}/pixels"][:], pixels)
        assert root[f"{key}/written"][:].all()


def test_chips_the_quality_rules_dropped_stay_dropped_until_the_rules_change(stac_api, client, tmp_path):
    out = tmp_path / "out"
    strict = make_spec(out, quality={"max_cloud": 0.0})
    first = run_pipeline(strict, client=client, catalog_url=stac_api, say=_quiet)
    dropped = [cid for cid, reason in first.skipped if reason.startswith("quality:")]
    assert dropped and len(dropped) == len(first.skipped)
    again = run_pipeline(strict, client=client, catalog_url=stac_api, say=_quiet)
    assert (again.chips_updated, again.chips_written, again.bytes_written, again.skipped) == (0, 0, 0, [])
    relaxed = run_pipeline(make_spec(out), client=client, catalog_url=stac_api, say=_quiet)
    assert relaxed.chips_updated == relaxed.chips_written == len(dropped) and relaxed.skipped == []


def test_a_locked_output_refuses_a_second_writer_and_a_stale_lock_is_broken(stac_api, client, tmp_path):
    out = tmp_path / "out"
    with OutputLock(out):
        with pytest.raises(EoprepError, match=r"another eoprep run \(pid \d+ on .*\) is writing this output"):
            run_pipeline(make_spec(out), client=client, catalog_url=stac_api, say=_quiet)
    assert not (out / "chips.zarr").exists()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".eoprep.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    summary = run_pipeline(make_spec(out), client=client, catalog_url=stac_api, say=_quiet)
    assert summary.chips_written > 0 and not (out / ".eoprep.lock").exists()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "eoprep.cli", *args]


def _write_spec(tmp_path: Path, spec) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    return path


def test_two_refreshes_at_once_one_waits(stac_api, tmp_path):
    spec = _write_spec(tmp_path, make_spec(tmp_path / "out"))
    lock = OutputLock(tmp_path / "out")
    lock.acquire()
    try:
        refused = subprocess.run(
            _cli("refresh", str(spec), "--catalog", stac_api, "--workers", "1"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert refused.returncode == 2 and "is writing this output; retry later or pass --wait" in refused.stderr
        waiting = subprocess.Popen(
            _cli("refresh", str(spec), "--catalog", stac_api, "--workers", "1", "--wait", "--json"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(4)
        assert waiting.poll() is None
    finally:
        lock.release()
    stdout, stderr = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, stderr[-2000:]
    assert json.loads(stdout)["chips_written"] > 0


def test_killing_the_whole_run_mid_write_is_finished_by_the_next_run(stac_api, client, tmp_path):
    spec = make_spec(tmp_path / "out", output__chips_per_shard=1)
    path = _write_spec(tmp_path, spec)
    proc = subprocess.Popen(
        _cli("run", str(path), "--catalog", stac_api, "--workers", "1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    shards = tmp_path / "out" / "chips.zarr" / "s2" / "pixels" / "c"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (shards.exists() and any(shards.iterdir())):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = xr.open_zarr(tmp_path / "out" / "chips.zarr", group="s2", consolidated=False)["written"].values
    assert not done.all(), "the run finished before it was killed; the test did not interrupt anything"

    resumed = run_pipeline(spec, client=client, catalog_url=stac_api, say=_quiet)
    assert resumed.chips_written == int((~done).sum()) and not resumed.skipped
    clean = tmp_path / "clean"
    run_pipeline(make_spec(clean), client=client, catalog_url=stac_api, say=_quiet)
    _assert_same_output(tmp_path / "out", clean)


def _kill_when_first_shard_lands(shards: Path, pid: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (shards.exists() and any(shards.iterdir())):
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)


def test_a_worker_killed_mid_run_loses_nothing(stac_api, tmp_path):
    spec = make_spec(tmp_path / "out", output__chips_per_shard=1)
    shards = tmp_path / "out" / "chips.zarr" / "s2" / "pixels" / "c"
    with dask_client(workers=2, say=_quiet) as own:
        victim = next(iter(own.run(os.getpid).values()))
        killer = threading.Thread(target=_kill_when_first_shard_lands, args=(shards, victim))
        killer.start()
        summary = run_pipeline(spec, client=own, catalog_url=stac_api, say=_quiet)
        killer.join()
        assert victim not in own.run(os.getpid).values(), "the worker was not killed"
        if summary.skipped:
            summary = run_pipeline(spec, client=own, catalog_url=stac_api, say=_quiet)
        assert not summary.skipped
        run_pipeline(make_spec(tmp_path / "clean"), client=own, catalog_url=stac_api, say=_quiet)
    _assert_same_output(tmp_path / "out", tmp_path / "clean")


class _FlakyProxy(http.server.ThreadingHTTPServer):
    """A real HTTP proxy in front of the real API: answers 503 to the first requests and stalls one."""

    def __init__(self, upstream: str, failures: int, stall: float) -> None:
        self.upstream, self.failures, self.stall, self.seen = upstream, failures, stall, 0
        super().__init__(("127.0.0.1", 0), _ProxyHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: _FlakyProxy

    def log_message(self, *args: object) -> None:
        pass

    def _forward(self) -> None:
        self.server.seen += 1
        if self.server.seen <= self.server.failures:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.server.seen == self.server.failures + 1:
            time.sleep(self.server.stall)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("content-length", "connection")}
        request = urllib.request.Request(
            self.server.upstream + self.path, data=body, headers=headers, method=self.command
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            payload = answer.read()
            self.send_response(answer.status)
            for k, v in answer.headers.items():
                if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _forward


def test_an_api_answering_5xx_and_timing_out_is_retried(stac_api, client, tmp_path):
    proxy = _FlakyProxy(stac_api, failures=3, stall=3.0)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        spec = make_spec(tmp_path / "out", source__timeout=1.5, source__retries=6)
        summary = run_pipeline(spec, client=client, catalog_url=proxy.url, say=_quiet)
    finally:
        proxy.shutdown()
    assert summary.chips_written > 0 and proxy.seen > 4
    run_pipeline(make_spec(tmp_path / "clean"), client=client, catalog_url=stac_api, say=_quiet)
    _assert_same_output(tmp_path / "out", tmp_path / "clean")


def test_cron_schedule_next_times():
    import datetime as dt

    at = dt.datetime(2026, 11, 25, 13, 7, tzinfo=dt.UTC)
    assert CronSchedule.parse("0 2 * * *").next_after(at) == dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.UTC)
    assert CronSchedule.parse("*/15 * * * *").next_after(at) == at.replace(minute=15)
    assert CronSchedule.parse("30 4 * * 1").next_after(at) == dt.datetime(2026, 11, 30, 4, 30, tzinfo=dt.UTC)
    with pytest.raises(EoprepError, match=r"--cron '0 25 \* \* \*': hour field '25' is outside 0-23"):
        CronSchedule.parse("0 25 * * *")
    with pytest.raises(EoprepError, match="needs 5 fields"):
        CronSchedule.parse("0 2 * *")


def test_schedule_stops_cleanly_on_sigterm(stac_api, tmp_path):
    spec = _write_spec(tmp_path, make_spec(tmp_path / "out"))
    proc = subprocess.Popen(
        _cli("schedule", str(spec), "--cron", "0 3 1 1 *", "--catalog", stac_api),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    line = ""
    while time.monotonic() < deadline and "next refresh" not in line:
        line = proc.stderr.readline()
    assert "next refresh of" in line and "01-01 03:00 UTC" in line
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert "schedule stopped" in proc.stderr.read()
