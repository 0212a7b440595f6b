"""Video codecs through PyAV (H.264, H.265, SVT-AV1, FFV1): time steps are frames.

Packing: every band (or KLT component) is one tile of a grey frame, tiles in a near-square grid, one frame
per time step. Grey pixel formats (``gray10le``/``gray12le``/``gray16le``) avoid the RGB→YUV conversion
that makes xarrayvideo's gbrp→yuv444 path inexact, let x265 code 12-bit planes bit-exactly in lossless
mode, and put all bands through one encoder so motion/intra search can use any tile as reference.
SVT-AV1 only takes 4:2:0, so its tiles go in the luma plane and chroma is a flat constant (costs ~nothing).
Packets are stored raw (no container), with the codec's extradata.
"""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np

from ._base import CodecError
from ._planes import tile_frames, untile_frames
from ._spec import CodecSpec

_ALIGN = 8
_ENCODERS = {
    "h264": ("libx264", "h264"),
    "h265": ("libx265", "hevc"),
    "av1": ("libsvtav1", "libdav1d"),
    "ffv1": ("ffv1", "ffv1"),
}


def _av():
    try:
        import av
    except ImportError as exc:  # pragma: no cover - av is a hard dependency
        raise CodecError("video codecs need PyAV: pip install 'av>=18.1'") from exc
    return av


def _pix_fmt(name: str, bit_depth: int) -> str:
    if name == "av1":
        return "yuv420p" if bit_depth == 8 else "yuv420p10le"
    if name == "ffv1":
        return "gray" if bit_depth == 8 else "gray16le"
    return {8: "gray", 10: "gray10le", 12: "gray12le"}[bit_depth]


def _options(spec: CodecSpec, knob: float | None) -> dict[str, str]:
    if spec.name == "h265":
        # info=0 drops the ~1.5 kB options SEI x265 writes into every stream, a large share of a small chip.
        params = "log-level=error:info=0" + (":lossless=1" if spec.lossless else "")
        opts = {"preset": spec.preset or "medium", "tune": "psnr", "x265-params": params}
        if not spec.lossless:
            opts["crf"] = f"{knob:.3f}"
        return opts
    if spec.name == "h264":
        opts = {"preset": spec.preset or "medium", "tune": "psnr"}
        opts.update({"qp": "0"} if spec.lossless else {"crf": f"{knob:.3f}"})
        return opts
    if spec.name == "av1":
        return {"preset": spec.preset or "8", "crf": str(round(knob)), "svtav1-params": "tune=1"}
    return {"level": "3", "coder": "range_tab", "context": "1", "slicecrc": "0"}


class VideoCodec:
    """One of h264/h265/av1/ffv1 over (T, C, Y, X) integer codes."""

    coded = True

    def __init__(self, name: str) -> None:
        self.name = name
        self.encoder, self.decoder = _ENCODERS[name]

    def knob_space(self, span: float) -> tuple[float, float, bool, bool]:
        """(best-quality knob, lowest-rate knob, log scale, integer)."""
        return (1.0, 63.0, False, True) if self.name == "av1" else (0.0, 51.0, False, False)

    def default_knob(self) -> float:
        """Codec default: CRF 23 (x264/x265), 35 (SVT-AV1)."""
        return 35.0 if self.name == "av1" else 23.0

    def encode(self, codes: np.ndarray, spec: CodecSpec, knob: float | None) -> tuple[dict, dict[str, bytes]]:
        """Encode codes as frames; return the decoder's needs and the packet bytes."""
        av = _av()
        bit_depth = 16 if self.name == "ffv1" and spec.coded_bit_depth > 8 else spec.coded_bit_depth
        frames = tile_frames(codes, _ALIGN).astype(np.uint8 if bit_depth == 8 else np.uint16)
        height, width = frames.shape[1:]
        pix_fmt = _pix_fmt(self.name, bit_depth)
        if self.name == "av1":
            os.environ.setdefault("SVT_LOG", "1")
        ctx = av.CodecContext.create(self.encoder, "w")
        ctx.width, ctx.height, ctx.pix_fmt = width, height, pix_fmt
        ctx.time_base, ctx.framerate = Fraction(1, 25), Fraction(25, 1)
        ctx.options = _options(spec, knob)
        packets: list[bytes] = []
        for i, plane in enumerate(frames):
            frame = _to_frame(av, plane, pix_fmt, bit_depth)
            frame.pts = i
            packets += [bytes(p) for p in ctx.encode(frame)]
        packets += [bytes(p) for p in ctx.encode(None)]
        params = {"pix_fmt": pix_fmt, "width": width, "height": height, "packets": [len(p) for p in packets]}
        sections = {"video": b"".join(packets)}
        if ctx.extradata:
            sections["extradata"] = bytes(ctx.extradata)
        return params, sections

    def decode(self, params: dict, sections: dict[str, memoryview], shape: tuple[int, ...]) -> np.ndarray:
        """Decode packets back to (T, C, Y, X) codes."""
        av = _av()
        ctx = av.CodecContext.create(self.decoder, "r")
        if self.name != "ffv1":
            # One thread: a chip's frames are small and x264/x265/SVT-AV1 write one slice per frame, so a
            # decoder's thread pool only costs its start-up (h265 33 -> 27 ms per 8×768² chip here).
            # FFV1 frames are cut into slices that decode in parallel (1.6x faster with threads).
            ctx.thread_count = 1
        ctx.width, ctx.height, ctx.pix_fmt = params["width"], params["height"], params["pix_fmt"]
        if "extradata" in sections:
            ctx.extradata = bytes(sections["extradata"])
        data, pos, planes = sections["video"], 0, []
        try:
            for size in params["packets"]:
                packet = av.Packet(bytes(data[pos : pos + size]))
                planes += [_from_frame(f, params["pix_fmt"]) for f in ctx.decode(packet)]
                pos += size
            planes += [_from_frame(f, params["pix_fmt"]) for f in ctx.decode(None)]
        except av.error.FFmpegError as exc:
            raise CodecError(f"{self.name} bitstream does not decode: {exc}") from exc
        if len(planes) != shape[0]:
            raise CodecError(f"{self.name} stream decoded to {len(planes)} frames, expected {shape[0]}")
        return untile_frames(np.stack(planes), shape, _ALIGN)


def _to_frame(av, plane: np.ndarray, pix_fmt: str, bit_depth: int):
    if not pix_fmt.startswith("yuv420"):
        return av.VideoFrame.from_ndarray(np.ascontiguousarray(plane), format=pix_fmt)
    height, width = plane.shape
    frame = av.VideoFrame(width, height, pix_fmt)
    dtype = np.dtype(np.uint8) if bit_depth == 8 else np.dtype("<u2")
    mid = 1 << (bit_depth - 1)
    for i, p in enumerate(frame.planes):
        rows = height if i == 0 else height // 2
        buf = np.full((rows, p.line_size // dtype.itemsize), mid, dtype=dtype)
        if i == 0:
            buf[:, :width] = plane
        p.update(buf.tobytes())
    return frame


def _from_frame(frame, pix_fmt: str) -> np.ndarray:
    """Read the luma/grey plane as stored; converting formats (e.g. a decoder's yuv420p for 4:0:0 H.264)
    through swscale would rescale ranges."""
    plane = frame.planes[0]
    dtype = np.dtype(np.uint8) if pix_fmt in ("gray", "yuv420p") else np.dtype("<u2")
    if frame.format.components[0].bits > 8 * dtype.itemsize:
        raise CodecError(f"decoder returned {frame.format.name}, expected samples fitting {pix_fmt}")
    rows = np.frombuffer(plane, dtype=dtype).reshape(frame.height, plane.line_size // dtype.itemsize)
    return rows[:, : frame.width].copy()
