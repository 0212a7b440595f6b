"""Rate–distortion benchmark: every codec spec on the same cubes, plus the xarrayvideo recipe as baseline.

The baseline is xarrayvideo's published recipe re-implemented on our PyAV code path so it is measured in
the same run on the same cubes: libx265, 12-bit, preset medium, tune psnr, bands grouped in threes (last
band repeated) as gbrp12le frames converted to yuv444p12le (RGB→YUV, limited range, as ffmpeg does),
per-band min–max scaling over the cube, fixed CRF levels, decoded values kept as floats. Its streams are
written without x265's options SEI (``info=0``, ~1.5 kB per stream, which ffmpeg would write), as ours are,
so the comparison is between the coding recipes and not their headers.

`default_specs` is the sweep both ``eoprep bench codecs`` and ``benchmarks/codecs_rd.py`` run, `summarize`
the table both print, and `cubes_from_output` reads benchmark cubes from a pipeline output.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pandas as pd

from eoprep.errors import EoprepError

from ._api import decode_chip, encode_chip
from ._spec import CodecSpec
from .metrics import bpppb, max_abs_error, psnr, spectral_angle, ssim, throughput_mbps

__all__ = [
    "BASELINE",
    "DEFAULT_BASELINE_CRFS",
    "QUICK_BASELINE_CRFS",
    "cubes_from_output",
    "default_specs",
    "encode_xarrayvideo",
    "psnr_at_bpppb",
    "run_codec_benchmark",
    "summarize",
]

BASELINE = "xarrayvideo-x265"
DEFAULT_BASELINE_CRFS = (0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 45, 51)
QUICK_BASELINE_CRFS = (0, 20, 40)

# Quality knob per lossy codec (see `CodecSpec.quality`), spanning ~0.02 to ~4 bpppb on S2-like cubes so that
# every curve brackets 0.1 and 1 bpppb. LERC's knob is a max error, so its sweep is a fraction of the data span.
SWEEPS: dict[str, tuple[float, ...]] = {
    "h264": (0, 6, 12, 18, 24, 30, 36, 42, 51),
    "h265": (0, 4, 10, 16, 22, 28, 34, 40, 46),
    "av1": (4, 12, 20, 28, 36, 44, 52, 60),
    "jpegxl": (0.05, 0.15, 0.4, 1.0, 2.0, 4.0, 8.0, 16.0),
    "jpeg2000": (30, 38, 46, 54, 62, 70, 78, 86),
    "htj2k": (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "lerc": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1),
}
QUICK_SWEEPS: dict[str, tuple[float, ...]] = {
    "h264": (0, 20, 40),
    "h265": (0, 20, 40),
    "av1": (4, 30, 56),
    "jpegxl": (0.05, 1.0, 16.0),
    "jpeg2000": (30, 55, 80),
    "htj2k": (1e-5, 3e-4, 1e-2),
    "lerc": (1e-3, 1e-2, 0.1),
}
_CODED_BITS = {"h264": 10, "h265": 12}


def encode_xarrayvideo(cube: np.ndarray, crf: float) -> tuple[int, np.ndarray]:
    """Encode ``cube`` (time, band, y, x) with the xarrayvideo recipe; return (payload bytes, decoded floats).

    Parameters
    ----------
    cube
        Chip values.
    crf
        x265 constant rate factor.

    Returns
    -------
    tuple
        Total bytes of all x265 streams (one per band triple; no container) and the float reconstruction.
        NaN pixels (which the recipe cannot code) are coded as their band's minimum and returned as NaN.
    """
    t, b, y, x = cube.shape
    values = cube.astype(np.float64)
    missing = np.isnan(values)
    if missing.any():
        values = np.where(missing, np.nanmin(values, axis=(0, 2, 3), keepdims=True), values)
    lo = values.min(axis=(0, 2, 3))
    span = np.where(values.max(axis=(0, 2, 3)) > lo, values.max(axis=(0, 2, 3)) - lo, 1.0)
    codes = np.rint((values - lo[:, None, None]) / span[:, None, None] * 4095).astype(np.uint16)
    groups = [[min(i, b - 1) for i in range(g, g + 3)] for g in range(0, b, 3)]
    decoded = np.zeros_like(values)
    total = 0
    for group in groups:
        enc = av.CodecContext.create("libx265", "w")
        enc.width, enc.height, enc.pix_fmt = x, y, "yuv444p12le"
        enc.time_base, enc.framerate = Fraction(1, 25), Fraction(25, 1)
        enc.options = {"preset": "medium", "tune": "psnr", "crf": str(crf), "x265-params": "log-level=error:info=0"}
        packets: list[bytes] = []
        for i in range(t):
            rgb = np.ascontiguousarray(np.moveaxis(codes[i, group], 0, -1))
            frame = av.VideoFrame.from_ndarray(rgb, format="gbrp12le").reformat(format="yuv444p12le")
            frame.pts = i
            packets += [bytes(p) for p in enc.encode(frame)]
        packets += [bytes(p) for p in enc.encode(None)]
        total += sum(len(p) for p in packets)
        dec = av.CodecContext.create("hevc", "r")
        frames = [f for p in packets for f in dec.decode(av.Packet(p))] + list(dec.decode(None))
        for i, frame in enumerate(frames):
            rgb = frame.reformat(format="gbrp12le").to_ndarray(format="gbrp12le")
            for k, band in enumerate(group):
                decoded[i, band] = rgb[..., k]
    decoded = decoded / 4095 * span[:, None, None] + lo[:, None, None]
    decoded[missing] = np.nan
    return total, decoded


def default_specs(cube: np.ndarray, *, quick: bool = False) -> list[CodecSpec]:
    """Every codec on ``cube``: a quality sweep of each lossy codec and each lossless mode the dtype allows.

    Lossless video and image codecs code integers only; lossless h264/h265 also need every band's value range
    to fit their bit depth, so they are left out of the sweep where the cube does not fit.

    Parameters
    ----------
    cube
        The chip (time, band, y, x) the specs are for.
    quick
        Three settings per lossy codec instead of eight or nine, for smoke runs.

    Returns
    -------
    list of CodecSpec
    """
    sweeps = QUICK_SWEEPS if quick else SWEEPS
    finite = cube[np.isfinite(cube)] if cube.dtype.kind == "f" else cube
    span = float(finite.max() - finite.min()) if finite.size else 1.0
    specs = [
        CodecSpec(name=name, max_error=q * span) if name == "lerc" else CodecSpec(name=name, quality=q)
        for name, sweep in sweeps.items()
        for q in sweep
    ]
    lossless = ["zstd", "blosc2", "lerc"]
    if cube.dtype.kind != "f":
        lossless += ["ffv1", "jpegxl", "jpeg2000", "htj2k"]
        ranges = np.ptp(cube, axis=(0, 2, 3)).astype(np.int64)
        lossless += [name for name, bits in _CODED_BITS.items() if ranges.max() < 2**bits]
    return specs + [CodecSpec(name=name, lossless=True) for name in lossless]


def _label(spec: CodecSpec) -> str:
    if spec.lossless:
        return f"{spec.name}-lossless"
    return spec.name if spec.decorrelate or spec.name == "lerc" else f"{spec.name}-nokl"


def _row(
    cube_name: str,
    cube: np.ndarray,
    codec: str,
    setting: str,
    n_bytes: int,
    decoded: np.ndarray,
    t_enc: float,
    t_dec: float,
    nodata: float | None,
) -> dict:
    return {
        "cube": cube_name,
        "codec": codec,
        "setting": setting,
        "shape": "x".join(map(str, cube.shape)),
        "bytes": n_bytes,
        "bpppb": bpppb(n_bytes, cube.shape),
        "ratio": cube.nbytes / n_bytes,
        "psnr_dtype": psnr(cube, decoded, peak="dtype", nodata=nodata),
        "psnr_range": psnr(cube, decoded, peak="range", nodata=nodata),
        "ssim": ssim(cube, decoded, nodata=nodata),
        "max_abs_error": max_abs_error(cube, decoded, nodata=nodata),
        "sam_deg": spectral_angle(cube, decoded, nodata=nodata),
        "exact": bool(np.array_equal(cube, decoded, equal_nan=cube.dtype.kind == "f")),
        "encode_mbps": throughput_mbps(cube.nbytes, t_enc),
        "decode_mbps": throughput_mbps(cube.nbytes, t_dec),
        "decode_chips_per_s": 1.0 / t_dec if t_dec > 0 else np.inf,
    }


def run_codec_benchmark(
    cubes: Mapping[str, np.ndarray],
    specs: Sequence[CodecSpec] | Callable[[np.ndarray], Sequence[CodecSpec]],
    out_dir: Path,
    *,
    baseline_crfs: Sequence[float] = DEFAULT_BASELINE_CRFS,
    nodata: float | None | Mapping[str, float | None] = None,
) -> pd.DataFrame:
    """Encode every cube with every spec (and the baseline at each CRF); write ``rd.csv`` and ``rd.png``.

    Parameters
    ----------
    cubes
        Name → chip array (time, band, y, x); each is encoded as one chip.
    specs
        Codec specs; give several per codec (quality sweep or targets) to trace a curve. A callable gets
        each cube and returns its specs (e.g. `default_specs`), for cubes of different dtypes.
    out_dir
        Folder for ``rd.csv`` and ``rd.png`` (created).
    baseline_crfs
        CRF levels of the xarrayvideo baseline; empty to skip it.
    nodata
        Missing-value marker, excluded from metrics and kept exactly by the codecs; a mapping gives one
        per cube name.

    Returns
    -------
    pandas.DataFrame
        One row per (cube, codec setting): bytes, bpppb, PSNR (dtype peak and data range), SSIM, max abs
        error, spectral angle, exactness, encode/decode MB/s and decoded chips/s.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for cube_name, cube in cubes.items():
        fill = nodata.get(cube_name) if isinstance(nodata, Mapping) else nodata
        for spec in specs(cube) if callable(specs) else specs:
            start = time.perf_counter()
            payload = encode_chip(cube, spec, nodata=fill)
            t_enc = time.perf_counter() - start
            start = time.perf_counter()
            decoded = decode_chip(payload)
            t_dec = time.perf_counter() - start
            setting = json.dumps(spec.model_dump(exclude_defaults=True, exclude={"name"}), sort_keys=True)
            rows.append(_row(cube_name, cube, _label(spec), setting, len(payload), decoded, t_enc, t_dec, fill))
        for crf in baseline_crfs:
            start = time.perf_counter()
            n_bytes, decoded = encode_xarrayvideo(cube, crf)
            elapsed = time.perf_counter() - start
            rows.append(
                _row(cube_name, cube, BASELINE, json.dumps({"crf": crf}), n_bytes, decoded, elapsed, elapsed, fill)
            )
    table = pd.DataFrame(rows)
    table.to_csv(out_dir / "rd.csv", index=False)
    _plot(table, out_dir / "rd.png")
    return table


def psnr_at_bpppb(table: pd.DataFrame, rate: float, *, metric: str = "psnr_range") -> pd.DataFrame:
    """PSNR of each (cube, codec) curve at ``rate`` bpppb, interpolated linearly in log(bpppb).

    Only lossy rows count; a curve that does not bracket ``rate`` gives NaN rather than an extrapolation.
    """
    out = []
    lossy = table[~table["codec"].str.endswith("-lossless") & np.isfinite(table[metric])]
    for (cube, codec), curve in lossy.groupby(["cube", "codec"]):
        curve = curve.sort_values("bpppb")
        x, y = np.log(curve["bpppb"].to_numpy()), curve[metric].to_numpy()
        # Keep the upper envelope: a setting that costs more bits for less PSNR is never chosen.
        y = np.maximum.accumulate(y)
        value = float(np.interp(np.log(rate), x, y)) if x[0] <= np.log(rate) <= x[-1] else np.nan
        out.append({"cube": cube, "codec": codec, "bpppb": rate, metric: value})
    return pd.DataFrame(out)


def summarize(table: pd.DataFrame, *, rates: Sequence[float] = (0.1, 1.0)) -> pd.DataFrame:
    """One row per codec: mean data-range PSNR over the cubes at each rate, and the pooled lossless ratio.

    A codec's lossless mode (``<codec>-lossless`` rows) is folded into its row. PSNR is NaN where a curve
    of any cube does not reach the rate; the lossless ratio is total raw bytes over total payload bytes.
    """
    family = table["codec"].str.removesuffix("-lossless")
    out = pd.DataFrame(index=pd.Index(list(dict.fromkeys(family)), name="codec"))
    for rate in rates:
        at = psnr_at_bpppb(table, rate)
        mean = at.groupby("codec")["psnr_range"].agg(lambda v: v.mean(skipna=False)) if len(at) else np.nan
        out[f"psnr@{rate:g}"] = mean
    lossless = table[table["codec"].str.endswith("-lossless")]
    raw = (lossless["bytes"] * lossless["ratio"]).groupby(family[lossless.index]).sum()
    out["lossless_ratio"] = raw / lossless.groupby(family[lossless.index])["bytes"].sum()
    out["lossless_exact"] = lossless.groupby(family[lossless.index])["exact"].all()
    return out


def cubes_from_output(output: str | Path, *, chips: int = 4) -> tuple[dict[str, np.ndarray], dict[str, float | None]]:
    """Benchmark cubes from a pipeline output: the first ``chips`` written chips of every group.

    Time slots where every pixel is nodata (padding, or no scene) are dropped, so codecs are measured
    on data rather than on fill.

    Parameters
    ----------
    output
        The output directory of an ``eoprep run`` (holding ``chips.zarr``).
    chips
        Chips per group.

    Returns
    -------
    tuple
        Cube name ``"<group>/<chip id>"`` → (time, band, y, x) array, and cube name → nodata value.
    """
    import xarray as xr
    import zarr

    from eoprep.sinks import CHIPS_STORE

    store = Path(output) / CHIPS_STORE
    if not (store / "zarr.json").exists():
        raise EoprepError(f"{store}: no chips store here; run `eoprep run SPEC` on this spec first")
    cubes: dict[str, np.ndarray] = {}
    nodata: dict[str, float | None] = {}
    for group in sorted(zarr.open_group(store, mode="r").group_keys()):
        ds = xr.open_zarr(store, group=group, mask_and_scale=False)
        fill = ds["pixels"].attrs.get("nodata")
        fill = None if fill is None else float(fill)
        taken = 0
        for i in np.flatnonzero(ds["written"].values):
            pixels = ds["pixels"].isel(chip=int(i)).values
            missing = np.isnan(pixels) if pixels.dtype.kind == "f" else np.zeros(pixels.shape, dtype=bool)
            if fill is not None and not math.isnan(fill):
                missing |= pixels == fill
            keep = ~missing.all(axis=(1, 2, 3))
            if not keep.any():
                continue
            name = f"{group}/{ds['chip'].values[i]}"
            cubes[name], nodata[name] = pixels[keep], fill
            taken += 1
            if taken == chips:
                break
    if not cubes:
        raise EoprepError(f"{store}: no written chip holds data; check the run's skipped chips with `eoprep inspect`")
    return cubes, nodata


def _plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(table["cube"]))
    cols = min(len(names), 4)
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names, strict=False):
        sub = table[(table["cube"] == name) & np.isfinite(table["psnr_range"])]
        for codec, curve in sub.groupby("codec"):
            curve = curve.sort_values("bpppb")
            style = "k--" if codec == BASELINE else "-"
            ax.plot(curve["bpppb"], curve["psnr_range"], style, marker="o", ms=3, label=codec)
        ax.set_xscale("log")
        ax.set_xlabel("bits per pixel per band")
        ax.set_ylabel("PSNR (dB, data range)")
        ax.set_title(name, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
