"""Co-registration accuracy and speed: residual RMSE (px) over injected shifts and cloud covers.

Cases: optical↔optical (demo S2 B04+B08 across dates; real S2 B04↔B08; real Landsat SR_B4↔SR_B5) and
SAR↔optical (demo S1 VV+VH against S2 B04+B08), with shifts uniform in ±5 px (every other one an
integer) and synthetic cloud covers of 0–60 % painted into the moving optical scene and masked.
RMSE is over the accepted estimates (confidence >= 0.05, the spec default); refusals are counted.
Each case is run by eoprep's gradient-orientation estimator, the intensity-correlation baseline and,
when it imports, AROSICS (same images, same masks). Prints a table and writes JSON.

    python benchmarks/coregistration.py [--cases 24] [--size 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window
from scipy import ndimage

from eoprep.align import estimate_shift, warp_to_grid
from eoprep.demo import S1_COLLECTION, S2_COLLECTION, SENSOR_SHIFTS, generate_archive
from eoprep.sources import ChipGrid

ROOT = Path(__file__).parents[1]
REAL = ROOT / "tests" / "data" / "align"
MARGIN = 12

#: reference, moving, reference mask, moving mask, modalities, true shift (px east, north)
Case = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, str], tuple[float, float]]


def _clouds(rng: np.random.Generator, shape: tuple[int, int], cover: float) -> np.ndarray:
    """Smooth cloud opacity covering about ``cover`` of the chip."""
    if cover <= 0:
        return np.zeros(shape)
    field = ndimage.gaussian_filter(rng.normal(size=shape), 10)
    return np.clip((field - np.quantile(field, 1 - cover)) / (field.std() * 0.5), 0, 1)


def _demo_cases(archive: Path, n: int, size: int, cover: float, seed: int) -> dict[str, list[Case]]:
    items = json.loads((archive / "catalog.json").read_text())["items"]
    s2 = [i for i in items if i["collection"] == S2_COLLECTION and i["properties"]["eo:cloud_cover"] < 1]
    s1 = [i for i in items if i["collection"] == S1_COLLECTION]
    rng = np.random.default_rng(seed)

    def read(item: dict, band: str, col: int, row: int) -> np.ndarray:
        with rasterio.open(item["assets"][band]["href"].removeprefix("file://")) as src:
            win = Window(col - MARGIN, row - MARGIN, size + 2 * MARGIN, size + 2 * MARGIN)
            return src.read(1, window=win).astype(np.float64)

    out: dict[str, list[Case]] = {"optical↔optical (demo S2)": [], "SAR↔optical (demo S1→S2)": []}
    s1_true = tuple(v / 10.0 for v in SENSOR_SHIFTS["sentinel-1"])
    for k in range(n):
        shift = rng.uniform(-5, 5, 2) if k % 2 else rng.integers(-5, 6, 2).astype(float)
        col, row = (int(v) for v in rng.integers(MARGIN + 10, 500 - size, 2))
        ref = np.stack([read(s2[0], b, col, row)[MARGIN:-MARGIN, MARGIN:-MARGIN] for b in ("B04", "B08")])
        cloud = _clouds(rng, ref.shape[1:], cover)
        clear = cloud < 0.05
        later = s2[1 + k % (len(s2) - 1)]
        mov = np.stack([_inject(read(later, b, col, row), shift) for b in ("B04", "B08")])
        mov = mov * (1 - cloud) + 9000 * cloud
        everywhere = np.ones_like(clear)
        out["optical↔optical (demo S2)"].append((ref, mov, everywhere, clear, ("optical", "optical"), tuple(shift)))
        sar = np.stack([_inject(read(s1[k % len(s1)], b, col, row), shift) for b in ("vv", "vh")])
        ref_cloudy = ref * (1 - cloud) + 9000 * cloud
        expected = (shift[0] + s1_true[0], shift[1] + s1_true[1])
        # Clouds sit on the optical reference here (SAR sees through them).
        out["SAR↔optical (demo S1→S2)"].append((ref_cloudy, sar, clear, everywhere, ("optical", "sar"), expected))
    return out


def _inject(image: np.ndarray, shift: np.ndarray) -> np.ndarray:
    moved = ndimage.shift(image, (-shift[1], shift[0]), order=3, mode="nearest")
    return moved[MARGIN:-MARGIN, MARGIN:-MARGIN]


def _real_cases(n: int, cover: float, seed: int) -> dict[str, list[Case]]:
    rng = np.random.default_rng(seed)
    setups = {
        "optical↔optical (real S2 B04→B08)": ("EPSG:32629", 285180.0, 2778820.0, 100.0, "s2_B04.tif", "s2_B08.tif"),
        "optical↔optical (real Landsat B4→B5)": (
            "EPSG:32624",
            398651.4 + 20 * 515,
            8110735.96 - 20 * 515,
            515.0,
            "landsat_SR_B4.tif",
            "landsat_SR_B5.tif",
        ),
    }
    out: dict[str, list[Case]] = {}
    for name, (crs, x0, y0, px, ref_file, mov_file) in setups.items():
        grid = ChipGrid(crs, x0, y0, 160, px)
        ref, ref_ok = warp_to_grid(REAL / ref_file, grid, resampling="cubic")
        out[name] = []
        for k in range(n):
            shift = rng.uniform(-5, 5, 2) if k % 2 else rng.integers(-5, 6, 2).astype(float)
            moved = ChipGrid(crs, x0 - shift[0] * px, y0 - shift[1] * px, 160, px)
            mov, mov_ok = warp_to_grid(REAL / mov_file, moved, resampling="cubic")
            cloud = _clouds(rng, mov.shape[1:], cover)
            image = np.where(mov_ok[0], mov[0] * (1 - cloud) + 9000 * cloud, 0)
            clear = mov_ok[0] & (cloud < 0.05)
            out[name].append((ref[0], image, ref_ok[0], clear, ("optical", "optical"), tuple(shift)))
    return out


def _eoprep(method: str) -> Callable[[Case], tuple[float, float, float]]:
    def run(case: Case) -> tuple[float, float, float]:
        ref, mov, ref_ok, mov_ok, modalities, _ = case
        est = estimate_shift(
            ref, mov, reference_valid=ref_ok, moving_valid=mov_ok, modalities=modalities, method=method
        )
        return est.dx, est.dy, est.confidence

    return run


def _arosics() -> tuple[Callable[[Case], tuple[float, float, float]] | None, str]:
    try:
        from arosics import COREG  # type: ignore[import-not-found]
        from geoarray import GeoArray  # type: ignore[import-not-found]
    except Exception as exc:
        return None, f"AROSICS not measured: it does not import here ({type(exc).__name__}: {exc}); " + (
            "`pip install arosics` fails building its `gdal` dependency (no gdal-config / GDAL headers)"
        )

    def run(case: Case) -> tuple[float, float, float]:
        ref, mov, ref_ok, mov_ok, _, _ = case
        gt, prj = (0, 1, 0, 0, 0, -1), "EPSG:32632"
        a = GeoArray(np.where(ref_ok, ref[0] if ref.ndim == 3 else ref, 0), gt, prj, nodata=0)
        b = GeoArray(np.where(mov_ok, mov[0] if mov.ndim == 3 else mov, 0), gt, prj, nodata=0)
        cr = COREG(a, b, ws=(64, 64), max_shift=8, q=True, nodata=(0, 0))
        info = cr.calculate_spatial_shifts()
        return (
            float(info["corrected_shifts_px"]["x"]),
            float(-info["corrected_shifts_px"]["y"]),
            float(cr.ssim_improved),
        )

    return run, "AROSICS measured"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=24, help="injected shifts per scenario and cloud cover")
    parser.add_argument("--size", type=int, default=128, help="chip size (px) for the demo cases")
    parser.add_argument("--covers", default="0,0.2,0.4,0.6", help="cloud covers, comma-separated")
    parser.add_argument("--archive", type=Path, help="an existing demo archive (else one is generated)")
    parser.add_argument("--json", type=Path, default=Path("coregistration.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        archive = args.archive or Path(tmp) / "demo"
        if args.archive is None:
            generate_archive(archive)
        methods: dict[str, Callable[[Case], tuple[float, float, float]]] = {
            "eoprep gradient": _eoprep("gradient"),
            "intensity NCC (baseline)": _eoprep("intensity"),
        }
        arosics, note = _arosics()
        if arosics is not None:
            methods["AROSICS"] = arosics
        rows = []
        for cover in (float(c) for c in args.covers.split(",")):
            scenarios = _demo_cases(archive, args.cases, args.size, cover, seed=int(cover * 100))
            scenarios |= _real_cases(max(args.cases // 2, 4), cover, seed=int(cover * 100) + 1)
            for scenario, cases in scenarios.items():
                for method, run in methods.items():
                    errors, confidences, seconds = [], [], []
                    for case in cases:
                        started = time.perf_counter()
                        dx, dy, confidence = run(case)
                        seconds.append(time.perf_counter() - started)
                        errors.append((dx - case[5][0], dy - case[5][1]))
                        confidences.append(confidence)
                    e = np.asarray(errors)
                    refused = ~np.isfinite(e).all(axis=1) | (np.asarray(confidences) < 0.05)
                    dist = np.sqrt(np.sum(e**2, axis=1))[~refused]
                    rows.append(
                        {
                            "scenario": scenario,
                            "cloud_cover": cover,
                            "method": method,
                            "cases": len(cases),
                            "refused": int(refused.sum()),
                            "rmse_px": float(np.sqrt(np.mean(dist**2))) if dist.size else float("nan"),
                            "p90_px": float(np.percentile(dist, 90)) if dist.size else float("nan"),
                            "over_1px": int(np.sum(dist > 1.0)),
                            "ms_per_chip": 1000 * float(np.mean(seconds)),
                        }
                    )
                    r = rows[-1]
                    print(
                        f"{scenario:38s} cloud {cover:3.1f}  {method:26s} RMSE {r['rmse_px']:7.3f} px  "
                        f"p90 {r['p90_px']:6.3f}  >1px {r['over_1px']:2d}  refused {r['refused']:2d}/{r['cases']}  "
                        f"{r['ms_per_chip']:5.1f} ms/chip",
                        flush=True,
                    )
    print(note)
    args.json.write_text(json.dumps({"rows": rows, "arosics": note}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
