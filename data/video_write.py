"""Writing video: frames to h264 mp4 bytes, and mp4 files written atomically.

    write_video("clip.mp4", video, fps=8)                 # video: float (3, T, H, W) in [-1, 1], or uint8 (T, H, W, 3)
    write_video("clip.mp4", video, fps=8, lossless=True)  # RGB h264 at qp 0: decodes to exactly these frames

The same frames give the same bytes. libx264 as PyAV drives it does not, for two measured reasons (the same
frames encoded 200 times in one process, `python -m bench.mp4_determinism`, `bench/results/mp4_determinism.json`;
the frames handed over, PyAV's colour conversion and the input's padding are the same every time):
- slice threads: PyAV opens encoders with slice threading, and x264's sliced threads (with their lookahead
  threads) give another bitstream now and then, seen plainly with x264's C functions (15 files in 200 encodes
  of a 256x256 clip); frame threads, which x264 keeps deterministic by design, gave one;
- AVX-512: where x264 uses its AVX-512 functions, one-thread encodes of noisy 64x64 frames gave two files (the
  second in about 1 of 10 tries; P-frames of other sizes); with every other instruction set, or none, one.
So the encoder runs frame threads and every instruction set it finds but AVX-512 (`_x264_params`), at the
speed of the default.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path

import av
import av.logging
import numpy as np
import torch

from checkpoint_io import atomic_path, write_bytes_atomic

from .video_io import tensor_to_frames


def _as_frames(video) -> np.ndarray:
    if isinstance(video, torch.Tensor):
        if video.dtype == torch.uint8:
            video = video.cpu().numpy()
        else:
            return tensor_to_frames(video)
    video = np.asarray(video)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(
            f"expected uint8 frames (T, H, W, 3) or a float tensor (3, T, H, W) in [-1, 1]; got {video.dtype} {video.shape}"
        )
    return video


@functools.lru_cache(maxsize=None)
def x264_cpu_capabilities() -> tuple[str, ...]:
    """The instruction sets libx264 finds on this CPU, as it names them (MMX2 ... AVX2 AVX512), read from the
    line it logs when an encoder opens; () when it says nothing (no x264, or it logs otherwise)."""
    previous = av.logging.get_level()
    av.logging.set_level(av.logging.INFO)
    try:
        with av.logging.Capture(local=False) as logs:
            ctx = av.CodecContext.create("libx264", "w")
            ctx.width = ctx.height = 16
            ctx.pix_fmt, ctx.time_base = "yuv420p", Fraction(1, 8)
            ctx.open()
            del ctx
    except (av.FFmpegError, ValueError):
        return ()
    finally:
        av.logging.set_level(previous)
    for _level, _name, message in logs:
        found = re.match(r"using cpu capabilities: (.*)", message.strip())
        if found:
            return tuple(found.group(1).split())
    return ()


def _x264_params(avx512: bool = False, sliced: bool = False) -> dict:
    """x264's options for repeatable bytes (see the module's docstring): frame threads, not the slice threads
    PyAV asks for, and every instruction set x264 detects but AVX-512. Only sets x264 itself found are named,
    so no instruction this CPU lacks is ever asked for. avx512 / sliced: leave that one as it was (the bench)."""
    params = [] if sliced else ["sliced-threads=0"]
    found = x264_cpu_capabilities()
    if not avx512 and "AVX512" in found:
        kept = [name for name in found if name != "AVX512"]
        params.append("asm=" + ("\\,".join(kept) if kept else "0"))
    return {"x264-params": ":".join(params)} if params else {}


class _Encoder:
    """An h264 stream in an mp4 container, fed frame by frame (see `encode_mp4` for the formats)."""

    def __init__(self, target, width: int, height: int, fps: float, crf: int = 18, codec: str = "libx264",
                 lossless: bool = False):
        if not lossless and (height % 2 or width % 2):
            raise ValueError(f"h264 with yuv420p needs an even width and height; got {width}x{height}: crop or pad "
                             f"one pixel")
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if lossless:
            codec, pix_fmt, options = "libx264rgb", "rgb24", {"qp": "0"}
        else:
            pix_fmt, options = "yuv420p", {"crf": str(crf)}
        if codec in ("libx264", "libx264rgb"):
            options.update(_x264_params())
        self.size = (height, width)
        self.container = av.open(target, mode="w", format="mp4")
        self.stream = self.container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, pix_fmt
        self.stream.options = options

    def write(self, frames: np.ndarray) -> None:
        """uint8 (T, H, W, 3) frames, appended."""
        if frames.shape[1:3] != self.size:
            raise ValueError(f"frames of {frames.shape[2]}x{frames.shape[1]} for a video of {self.size[1]}x{self.size[0]}")
        for f in frames:
            self.container.mux(self.stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))

    def close(self) -> None:
        self.container.mux(self.stream.encode())
        self.container.close()


def encode_mp4(video, fps: float, crf: int = 18, codec: str = "libx264", lossless: bool = False) -> bytes:
    """Encode frames as h264 mp4 bytes: yuv420p at `crf`, or with lossless=True RGB at qp 0 (libx264rgb), which
    decodes to exactly these frames (about 3x the size; FFmpeg and browsers built on it play it, some players do
    not). `video`: uint8 (T, H, W, 3) or float (3, T, H, W) in [-1, 1]. The same frames give the same bytes."""
    frames = _as_frames(video)
    buf = io.BytesIO()
    encoder = _Encoder(buf, frames.shape[2], frames.shape[1], fps, crf, codec, lossless)
    try:
        encoder.write(frames)
    finally:
        encoder.close()
    return buf.getvalue()


def write_video(path: str | os.PathLike, video, fps: float, crf: int = 18, lossless: bool = False) -> Path:
    """Write an mp4 atomically (temporary file, then rename): a crash never leaves half a video."""
    path = Path(path)
    write_bytes_atomic(path, encode_mp4(video, fps, crf=crf, lossless=lossless))
    return path


@contextlib.contextmanager
def video_writer(path: str | os.PathLike, width: int, height: int, fps: float, crf: int = 18,
                 lossless: bool = False) -> Iterator[Callable]:
    """Write an mp4 a chunk of frames at a time, for videos longer than memory; the same bytes as `write_video`
    of all the frames at once. Atomic as write_video: the file appears, whole, when the block ends.

        with video_writer("long.mp4", w, h, fps=16) as write:
            for chunk in chunks:          # uint8 (T, H, W, 3), or float (3, T, H, W) in [-1, 1]
                write(chunk)
    """
    with atomic_path(path) as tmp:
        encoder = _Encoder(str(tmp), width, height, fps, crf, lossless=lossless)
        try:
            yield lambda frames: encoder.write(_as_frames(frames))
        finally:
            encoder.close()
