"""Rate–distortion of eoprep codecs vs the xarrayvideo recipe (issue 8), on real S2 scenes and demo time cubes.

Real scenes (single date, spatial side): 10 S2 L2A bands of tile 29RKH resampled to the 20 m-band grid
(549², 10 m bands 2×2-averaged), cropped to 256² windows. Time cubes: 128² chips × 8 dates × 6 reflectance
bands (B02 B03 B04 B08 B11 B12) read with `eoprep.sources.read_items` from the demo archive on grid cells of
`eoprep.demo.DEMO_BBOX` (the archive is generated once into the eoprep cache, ``$EOPREP_CACHE``).

Runs `eoprep.codecs.bench.default_specs` (the sweep of ``eoprep bench codecs``) on every cube. Prints PSNR
(data range and uint16 peak) at 0.1 and 1 bpppb per codec, interpolated on each curve, our
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
from eoprep.codecs.bench import BASELINE, default_specs, psnr_at_bpppb, run_codec_benchmark, summarize
from eoprep.demo import DEMO_BBOX, S2_COLLECTION
from eoprep.embedded import demo_archive
from eoprep.grid import GlobalGrid
from eoprep.sources import ChipGrid, read_items

SCENE = Path(__file__).resolve().parents[2] / "shared" / "data" / "s2-l2a-29RKH-20200219"
BANDS = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]
DEMO_BANDS = ["B02", "B03", "B04", "B08", "B11", "B12"]
READ_BOUND_MBPS = 94.0  # DESIGN.md: rasterio windows in a 2-process pool on this machine


def load_scene() -> np.ndarray:
    """(band, y, x) uint16 on the 549² grid of the 20 m bands."""
    out = []
    for band in BANDS:
        with rasterio.open(SCENE / f"{band}.tif") as src:
            out.append(src.read(1, out_shape=(549, 549), resampling=Resampling.average))
    return np.stack(out)


def demo_cubes(n: int) -> dict[str, np.ndarray]:
    """``n`` demo chips (8, 6, 128, 128) uint16 from evenly spaced 1280 m cells of the demo AOI."""
    archive = demo_archive(say=lambda _m: None)
    items = [i for i in archive.items if i["collection"] == S2_COLLECTION]
    cells = GlobalGrid(cell_size=1280, pixel_size=10).cells_in_bbox(DEMO_BBOX)
    picks = [cells[i] for i in np.linspace(0, len(cells) - 1, n + 2).astype(int)[1:-1]]
    cubes = {}
    for cell in picks:
        grid = ChipGrid(cell.crs, cell.x0, cell.y0, cell.size, cell.pixel_size)
        cubes[f"demo-{cell.id}"] = read_items(items, DEMO_BANDS, grid, dtype=np.dtype("uint16"), nodata=0)
    return cubes


def build_cubes(scene: np.ndarray, quick: bool) -> dict[str, np.ndarray]:
    cubes = {"s2-real-a": scene[None, :, 20:276, 20:276], "s2-real-b": scene[None, :, 270:526, 250:506]}
    return cubes | demo_cubes(1 if quick else 2)


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
    table = run_codec_benchmark(cubes, default_specs, args.out, nodata=0)

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

    lossless_rows = table[table["codec"].str.endswith("-lossless")]
    ratios = lossless_rows.pivot(index="codec", columns="cube", values="ratio")
    zstd = table[table["codec"] == "zstd-lossless"].set_index("cube")["ratio"]
    print(f"\nLossless ratio (all exact: {bool(lossless_rows['exact'].all())})\n{ratios.round(2).to_string()}")
    print("vs zstd-3:\n" + (ratios / zstd).round(2).to_string())
    report["lossless_ratio"] = json.loads(ratios.round(3).to_json())
    report["lossless_exact"] = bool(lossless_rows["exact"].all())

    chip = next(cube for name, cube in cubes.items() if name.startswith("demo-"))
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
    for kind in ("s2-real", "demo"):
        rows = table[table["cube"].str.startswith(kind)]
        print(f"\nSummary, {kind} cubes (mean data-range PSNR, pooled lossless ratio)")
        print(summarize(rows).drop(columns="lossless_exact").round(2).to_string(na_rep="–"))
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report["gain_db"], indent=1))


if __name__ == "__main__":
    main()
