"""Writing video: frames to h264 (yuv420p) mp4 bytes, and mp4 files written atomically.

    write_video("clip.mp4", video, fps=8)      # video: float (3, T, H, W) in [-1, 1], or uint8 (T, H, W, 3)
"""

from __future__ import annotations

import io
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from checkpoint_io import write_bytes_atomic

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


def encode_mp4(video, fps: float, crf: int = 18, codec: str = "libx264") -> bytes:
    """Encode frames as h264 (yuv420p) mp4 bytes. `video`: uint8 (T, H, W, 3) or float (3, T, H, W) in [-1, 1]."""
    frames = _as_frames(video)
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"h264 with yuv420p needs an even width and height; got {w}x{h}: crop or pad one pixel")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf)}
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def write_video(path: str | os.PathLike, video, fps: float, crf: int = 18) -> Path:
    """Write an mp4 atomically (temporary file, then rename): a crash never leaves half a video."""
    path = Path(path)
    write_bytes_atomic(path, encode_mp4(video, fps, crf=crf))
    return path
