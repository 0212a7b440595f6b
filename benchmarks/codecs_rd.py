"""Rate–distortion of eoprep codecs vs the xarrayvideo recipe (issue 8), on real S2 scenes and time cubes.

Real scenes (single date, spatial side): 10 S2 L2A bands of tile 29RKH resampled to the 20 m-band grid
(549², 10 m bands 2×2-averaged), cropped to 256² windows. Time cubes: 128² windows of the same scene with
8 simulated dates (sub-pixel-ish shifts, gain changes, bright cloud blobs) until the demo generator exists.

Prints PSNR (data range and uint16 peak) at 0.1 and 1 bpppb per codec, interpolated on each curve, our
best codec's gain over the baseline, lossless ratios vs zstd-3, and decode chips/s; writes JSON, CSV, PNG.

    .venv/bin/python benchmarks/codecs_rd.py [--out out/codecs_rd] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
from rasterio.enums import Resampling

from eoprep.codecs import CodecSpec, decode_chip, encode_chip
from eoprep.codecs.bench import BASELINE, psnr_at_bpppb, run_codec_benchmark

SCENE = Path(__file__).resolve().parents[2] / "shared" / "data" / "s2-l2a-29RKH-20200219"
BANDS = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]
SWEEPS = {
    "h265": [("quality", q) for q in (0, 4, 10, 16, 22, 28, 34, 40, 46)],
    "av1": [("quality", q) for q in (4, 12, 20, 28, 36, 44, 52, 60)],
    "jpegxl": [("quality", q) for q in (0.05, 0.15, 0.4, 1.0, 2.0, 4.0, 8.0, 16.0)],
    "jpeg2000": [("quality", q) for q in (30, 38, 46, 54, 62, 70, 78, 86)],
}
READ_BOUND_MBPS = 94.0  # DESIGN.md: rasterio windows in a 2-process pool on this machine


def load_scene() -> np.ndarray:
    """(band, y, x) uint16 on the 549² grid of the 20 m bands."""
    out = []
    for band in BANDS:
        with rasterio.open(SCENE / f"{band}.tif") as src:
            out.append(src.read(1, out_shape=(549, 549), resampling=Resampling.average))
    return np.stack(out)


def time_cube(scene: np.ndarray, y0: int, x0: int, *, size: int = 128, dates: int = 8, seed: int = 0) -> np.ndarray:
    """Simulate ``dates`` acquisitions of one window: 0–2 px shifts, ±8 % gain, one or two cloud blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    frames = []
    for _ in range(dates):
        dy, dx = rng.integers(-2, 3, size=2)
        window = scene[:, y0 + dy : y0 + dy + size, x0 + dx : x0 + dx + size].astype(np.float64)
        window *= 1 + rng.uniform(-0.08, 0.08)
        for _ in range(rng.integers(0, 3)):
            cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(8, 30)
            cloud = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
            window = window * (1 - 0.8 * cloud) + 0.8 * cloud * 6000
        frames.append(np.clip(window, 1, 65535))
    return np.stack(frames).astype(np.uint16)


def build_cubes(scene: np.ndarray, quick: bool) -> dict[str, np.ndarray]:
    cubes = {"s2-real-a": scene[None, :, 20:276, 20:276], "s2-real-b": scene[None, :, 270:526, 250:506]}
    cubes["s2-time-a"] = time_cube(scene, 60, 300, seed=1)
    if not quick:
        cubes["s2-time-b"] = time_cube(scene, 300, 80, seed=2)
    return cubes


def decode_rate(cube: np.ndarray, spec: CodecSpec, repeats: int = 5) -> float:
    payload = encode_chip(cube, spec)
    start = time.perf_counter()
    for _ in range(repeats):
        decode_chip(payload)
    return repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/codecs_rd"))
    parser.add_argument("--quick", action="store_true", help="fewer cubes, for a smoke run")
    args = parser.parse_args()

    scene = load_scene()
    if (scene == 0).any(axis=0)[20:526, 20:526].any():
        raise SystemExit("scene windows contain nodata; move the crops")
    cubes = build_cubes(scene, args.quick)
    specs = [CodecSpec(name=n, **{k: v}) for n, sweep in SWEEPS.items() for k, v in sweep]
    lossless = [
        CodecSpec(name="zstd", level=3),
        CodecSpec(name="ffv1"),
        CodecSpec(name="jpegxl", lossless=True),
        CodecSpec(name="jpeg2000", lossless=True),
        CodecSpec(name="blosc2"),
    ]
    table = run_codec_benchmark(cubes, specs + lossless, args.out)

    report: dict = {"cubes": {k: list(v.shape) for k, v in cubes.items()}, "psnr": {}, "gain_db": {}}
    for rate in (0.1, 1.0):
        for metric in ("psnr_range", "psnr_dtype"):
            at = psnr_at_bpppb(table, rate, metric=metric)
            pivot = at.pivot(index="codec", columns="cube", values=metric)
            print(f"\nPSNR ({metric}) at {rate} bpppb\n{pivot.round(2).to_string()}")
            report["psnr"][f"{metric}@{rate}"] = json.loads(pivot.round(3).to_json())
            ours = pivot.drop(index=BASELINE)
            gain = (ours.max() - pivot.loc[BASELINE]).round(2)
            best = ours.idxmax()
            report["gain_db"][f"{metric}@{rate}"] = {c: {"best": best[c], "gain": gain[c]} for c in pivot.columns}
            print("best:", best.to_dict(), "gain over baseline (dB):", gain.to_dict())

    lossless_rows = table[table["codec"].str.endswith("-lossless") | table["codec"].isin(["zstd", "blosc2"])]
    ratios = lossless_rows.pivot(index="codec", columns="cube", values="ratio")
    zstd = table[table["codec"] == "zstd-lossless"].set_index("cube")["ratio"]
    print(f"\nLossless ratio (all exact: {bool(lossless_rows['exact'].all())})\n{ratios.round(2).to_string()}")
    print("vs zstd-3:\n" + (ratios / zstd).round(2).to_string())
    report["lossless_ratio"] = json.loads(ratios.round(3).to_json())
    report["lossless_exact"] = bool(lossless_rows["exact"].all())

    chip = cubes["s2-time-a"]
    chip_mb = chip.nbytes / 1e6
    speeds = {}
    for spec in (
        CodecSpec(name="zstd"),
        CodecSpec(name="h265", target_bpppb=0.5),
        CodecSpec(name="av1", quality=36),
        CodecSpec(name="jpegxl", quality=1.0),
        CodecSpec(name="jpeg2000", quality=54),
        CodecSpec(name="ffv1"),
    ):
        rate = decode_rate(chip, spec)
        speeds[spec.name + ("-lossless" if spec.lossless else "")] = {
            "chips_per_s": round(rate, 1),
            "mb_per_s": round(rate * chip_mb, 1),
            "vs_read_bound": round(rate * chip_mb / READ_BOUND_MBPS, 2),
        }
    print(f"\nDecode speed, one chip {chip.shape} uint16 ({chip_mb:.2f} MB), 1 core:")
    print(pd.DataFrame(speeds).T.to_string())
    report["decode"] = speeds
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report["gain_db"], indent=1))


if __name__ == "__main__":
    main()
