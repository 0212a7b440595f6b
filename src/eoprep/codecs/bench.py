"""Rate–distortion benchmark: every codec spec on the same cubes, plus the xarrayvideo recipe as baseline.

The baseline is xarrayvideo's published recipe re-implemented on our PyAV code path so it is measured in
the same run on the same cubes: libx265, 12-bit, preset medium, tune psnr, bands grouped in threes (last
band repeated) as gbrp12le frames converted to yuv444p12le (RGB→YUV, limited range, as ffmpeg does),
per-band min–max scaling over the cube, fixed CRF levels, decoded values kept as floats. Its streams are
written without x265's options SEI (``info=0``, ~1.5 kB per stream, which ffmpeg would write), as ours are,
so the comparison is between the coding recipes and not their headers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pandas as pd

from ._api import decode_chip, encode_chip
from ._spec import CodecSpec
from .metrics import bpppb, max_abs_error, psnr, spectral_angle, ssim, throughput_mbps

__all__ = ["BASELINE", "encode_xarrayvideo", "psnr_at_bpppb", "run_codec_benchmark"]

BASELINE = "xarrayvideo-x265"
DEFAULT_BASELINE_CRFS = (0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 45, 51)


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
    """
    t, b, y, x = cube.shape
    values = cube.astype(np.float64)
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
    return total, decoded / 4095 * span[:, None, None] + lo[:, None, None]


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
    cubes: dict[str, np.ndarray],
    specs: list[CodecSpec],
    out_dir: Path,
    *,
    baseline_crfs: Sequence[float] = DEFAULT_BASELINE_CRFS,
    nodata: float | None = None,
) -> pd.DataFrame:
    """Encode every cube with every spec (and the baseline at each CRF); write ``rd.csv`` and ``rd.png``.

    Parameters
    ----------
    cubes
        Name → chip array (time, band, y, x); each is encoded as one chip.
    specs
        Codec specs; give several per codec (quality sweep or targets) to trace a curve.
    out_dir
        Folder for ``rd.csv`` and ``rd.png`` (created).
    baseline_crfs
        CRF levels of the xarrayvideo baseline; empty to skip it.
    nodata
        Missing-value marker, excluded from metrics and kept exactly by the codecs.

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
        for spec in specs:
            start = time.perf_counter()
            payload = encode_chip(cube, spec, nodata=nodata)
            t_enc = time.perf_counter() - start
            start = time.perf_counter()
            decoded = decode_chip(payload)
            t_dec = time.perf_counter() - start
            setting = json.dumps(spec.model_dump(exclude_defaults=True, exclude={"name"}), sort_keys=True)
            rows.append(_row(cube_name, cube, _label(spec), setting, len(payload), decoded, t_enc, t_dec, nodata))
        for crf in baseline_crfs:
            start = time.perf_counter()
            n_bytes, decoded = encode_xarrayvideo(cube, crf)
            elapsed = time.perf_counter() - start
            rows.append(
                _row(cube_name, cube, BASELINE, json.dumps({"crf": crf}), n_bytes, decoded, elapsed, elapsed, nodata)
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


def _plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(table["cube"]))
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        sub = table[(table["cube"] == name) & np.isfinite(table["psnr_range"])]
        for codec, curve in sub.groupby("codec"):
            curve = curve.sort_values("bpppb")
            style = "k--" if codec == BASELINE else "-"
            ax.plot(curve["bpppb"], curve["psnr_range"], style, marker="o", ms=3, label=codec)
        ax.set_xscale("log")
        ax.set_xlabel("bits per pixel per band")
        ax.set_ylabel("PSNR (dB, data range)")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
