"""The command line as a user runs it: real subprocesses, real servers, real LocalCluster."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from conftest import make_spec

pytestmark = pytest.mark.slow


def _eoprep(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "eoprep.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def _spec_file(tmp_path: Path, **changes) -> Path:
    spec = make_spec(tmp_path / "out", **changes)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    return path


def test_run_shows_dashboard_progress_and_summary_then_inspect(stac_api, tmp_path):
    spec = _spec_file(tmp_path)
    proc = _eoprep("run", str(spec), "--catalog", stac_api, "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert "dashboard http://127.0.0.1:" in proc.stderr
    assert re.search(r"^chips .* (\d+)/\1 ", proc.stderr, re.M), "no finished progress bar"
    assert "chips written" in proc.stderr and "MB" in proc.stderr

    again = _eoprep("run", str(spec), "--catalog", stac_api, "--workers", "1", "--json")
    summary = json.loads(again.stdout)
    assert summary["chips_written"] == 0 and summary["chips_present"] > 0 and summary["bytes_written"] == 0

    shown = _eoprep("inspect", str(tmp_path / "out"))
    assert shown.returncode == 0 and "s2" in shown.stderr and "run " in shown.stderr
    ids = list(json.loads(next((tmp_path / "out" / "runs").glob("*.json")).read_text())["input_items"]["s2"])
    index_chip = _first_chip(tmp_path / "out")
    detail = _eoprep("inspect", str(tmp_path / "out"), "--chip", index_chip)
    assert detail.returncode == 0 and ids[0] in detail.stderr and index_chip in detail.stderr


def _first_chip(out: Path) -> str:
    import geopandas as gpd

    return str(gpd.read_parquet(out / "index.parquet")["id"].iloc[0])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "missing.yaml"], "missing.yaml: cannot read spec"),
        (["inspect", "/nonexistent"], "/nonexistent: not an eoprep output"),
    ],
)
def test_user_errors_are_one_line_with_exit_2(args, message):
    proc = _eoprep(*args)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr


def test_a_worker_count_below_one_is_refused_before_anything_starts(tmp_path):
    proc = _eoprep("run", str(_spec_file(tmp_path)), "--workers", "0")
    assert proc.returncode == 2
    assert "argument --workers: expected a whole number of at least 1, got '0'" in proc.stderr
    assert "Dask" not in proc.stderr and not (tmp_path / "out").exists()


def test_unknown_band_exits_2_and_writes_nothing(stac_api, tmp_path):
    spec = _spec_file(tmp_path, source__collections=[{"id": "demo-sentinel-2-l2a", "bands": ["B02", "B13"]}])
    proc = _eoprep("run", str(spec), "--catalog", stac_api, "--workers", "1")
    assert proc.returncode == 2
    assert "source.collections[0].bands: ['B13'] not among the assets" in proc.stderr
    assert "0/?" not in proc.stderr, "a progress bar for work that never started"
    assert not (tmp_path / "out").exists()


def test_unreachable_scheduler_is_one_line(stac_api, tmp_path):
    proc = _eoprep("run", str(_spec_file(tmp_path)), "--catalog", stac_api, "--scheduler", "tcp://127.0.0.1:9")
    assert (
        proc.returncode == 2 and "--scheduler: cannot connect to the Dask scheduler at tcp://127.0.0.1:9" in proc.stderr
    )


def test_embedded_default_end_to_end_and_serve_catalog(tmp_path):
    """The README's first command: the spec says `url: embedded`, eoprep generates and serves the archive."""
    env = {"EOPREP_CACHE": str(tmp_path / "cache")}
    spec = _spec_file(tmp_path)
    data = yaml.safe_load(spec.read_text())
    assert data["source"]["url"] == "embedded"
    proc = _eoprep("run", str(spec), "--workers", "1", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "generating the demo archive" in proc.stderr and "embedded STAC API at http://127.0.0.1:" in proc.stderr
    assert (tmp_path / "out" / "chips.zarr").exists()

    server = subprocess.Popen(
        [sys.executable, "-m", "eoprep.cli", "serve-catalog"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    try:
        url = server.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        ids = {c["id"] for c in requests.get(f"{url}/collections", timeout=10).json()["collections"]}
        assert {"demo-sentinel-2-l2a", "demo-sentinel-1-rtc", "demo-landsat-c2-l2"} <= ids
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/collections", timeout=5)
    from eoprep.catalog_server import LocalStacServer

    LocalStacServer(tmp_path / "cache" / "catalog").destroy()
