"""Video reading with PyAV: probe a file, read a window of `1 + 4k` frames at a target fps (writing mp4 is
data/video_write.py).

Every reader here takes a path or the file's bytes (a shard member), decodes with frame threading
(`thread_type="AUTO"`), seeks to the keyframe before the window instead of decoding from the start,
converts and resizes only the frames it keeps (in swscale, not in Python), and always closes the
container. Images (png, jpg, ...) are one-frame videos.

Conventions: frames are uint8 `(T, H, W, 3)` RGB in numpy; videos are float `(3, T, H, W)` in [-1, 1]
in torch, which is what crosses module boundaries as `(B, 3, T, H, W)`.
"""

from __future__ import annotations

import io
import math
import numbers
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import Union

import av
import numpy as np
import torch

from errors import InputError, MissingInputError

from .decoding import (ORIENTATIONS, SWAPS_SIDES, Reoriented, StreamEnded, VideoReadError, decode_indices,
                       frame_orientation, iter_indices, stream_fps)

Source = Union[str, os.PathLike, bytes]

VIDEO_EXTENSIONS = ("mp4", "avi", "mov", "mkv", "webm", "m4v", "mpg", "mpeg", "ts", "gif")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "webp")
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS


class ClipTooShortError(ValueError):
    """The video decodes, but has fewer frames than the requested window needs."""


def nearest_valid_frame_counts(n: int) -> tuple[int, int]:
    """The valid counts `1 + 4k` just below and just above n (equal when n is valid)."""
    lower = 1 + 4 * max(0, (n - 1) // 4)
    return lower, lower if lower == n else lower + 4


def size_pair(size, what: str = "--size") -> tuple[int, int]:
    """(height, width) from a size option: one side (a square) or two (height, width), each positive."""
    values = [size] if isinstance(size, numbers.Integral) else list(size)
    if len(values) not in (1, 2) or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1
                                        for v in values):
        raise InputError(f"{what} takes one side (a square) or two, HEIGHT WIDTH, in positive pixels; got "
                         f"{' '.join(map(str, values)) or 'nothing'}")
    return (int(values[0]), int(values[-1]))


def check_frame_count(n: int, what: str = "frames") -> None:
    """Raise an InputError naming the nearest valid counts unless n = 1 + 4k (k >= 0)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise InputError(f"{what} must be a positive integer of the form 1 + 4k (1, 5, 9, 13, 17, ...); got {n!r}")
    if (n - 1) % 4:
        lower, upper = nearest_valid_frame_counts(int(n))
        raise InputError(
            f"{what} must be 1 + 4k (1, 5, 9, 13, 17, ...) because the first frame is encoded alone "
            f"and the rest in groups of 4; got {n}: use {lower} or {upper}"
        )


@dataclass(frozen=True)
class VideoInfo:
    """What a shard's `KEY.json` records about its video."""

    fps: float  # the file's own frame rate; 0.0 for an image
    frames: int  # frames present (packets demuxed) when probed, else the header's count
    width: int
    height: int
    duration: float  # seconds; 0.0 for an image
    codec: str
    declared_frames: int = 0  # what the header claims, when probing found fewer (0: no shortfall)
    orientation: str = ""  # how frames are turned for display (a phone's display matrix, see ORIENTATIONS); width
    # and height are the displayed ones

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict) -> "VideoInfo | None":
        """The VideoInfo recorded in a shard's KEY.json, or None when it lacks the fields."""
        return cls.from_json(meta) if {"fps", "frames", "width", "height"} <= meta.keys() else None

    @classmethod
    def from_json(cls, d: dict) -> "VideoInfo":
        return cls(
            fps=float(d["fps"]),
            frames=int(d["frames"]),
            width=int(d["width"]),
            height=int(d["height"]),
            duration=float(d.get("duration", 0.0)),
            codec=str(d.get("codec", "")),
            declared_frames=int(d.get("declared_frames", 0)),
            orientation=d["orientation"] if d.get("orientation") in ORIENTATIONS else "",
        )


def _open(source: Source) -> av.container.InputContainer:
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            return av.open(io.BytesIO(bytes(source)), mode="r")
        return av.open(os.fspath(source), mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise VideoReadError(f"cannot open as video: {_reason(e)}") from e


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise VideoReadError("no video stream in the file")
    return container.streams.video[0]


def _is_image_format(container: av.container.InputContainer) -> bool:
    name = container.format.name
    return name.endswith("_pipe") or name == "image2"


def _header_info(container, stream) -> VideoInfo:
    if _is_image_format(container):
        return VideoInfo(0.0, 1, stream.width, stream.height, 0.0, stream.codec_context.name)
    fps = stream_fps(stream)
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    else:
        duration = 0.0
    frames = stream.frames or (int(round(duration * fps)) if fps > 0 else 0)
    return VideoInfo(fps, frames, stream.width, stream.height, duration, stream.codec_context.name)


def probe(source: Source) -> VideoInfo:
    """Check that `source` is a decodable video and measure it.

    Demuxes every packet (cheap: nothing is decoded) to count the frames the file holds, whatever its
    header claims (a truncated file's header promises more: the claim is kept in `declared_frames`), then
    decodes the first frame. Raises VideoReadError with the reason when the file is unusable.
    """
    container = _open(source)
    try:
        stream = _video_stream(container)
        info = _header_info(container, stream)
        if info.width <= 0 or info.height <= 0:
            raise VideoReadError("video stream has no frame size")
        try:
            packets = sum(1 for p in container.demux(stream) if p.size > 0)
        except av.FFmpegError as e:
            raise VideoReadError(f"demuxing failed (truncated or corrupt file): {_reason(e)}") from e
        if packets == 0:
            raise VideoReadError("the video stream holds no frames")
        declared = stream.frames if stream.frames and stream.frames > packets else 0
        container.seek(0)
        try:
            orientation = frame_orientation(next(container.decode(stream)))
        except (av.FFmpegError, StopIteration) as e:
            raise VideoReadError(f"the first frame does not decode: {_reason(e)}") from e
        frames = 1 if _is_image_format(container) else packets
        duration = frames / info.fps if info.fps > 0 and (declared or info.duration <= 0) else info.duration
        width, height = (info.height, info.width) if orientation in SWAPS_SIDES else (info.width, info.height)
        return VideoInfo(info.fps, frames, width, height, duration, info.codec, declared, orientation)
    finally:
        container.close()


@dataclass
class Clip:
    """A window of frames read from a video."""

    frames: np.ndarray  # uint8 (T, H, W, 3)
    fps: float  # effective rate of the window: the file's rate divided by the stride
    start: int  # index of the first source frame
    stride: float  # source frames per output frame
    decoded: int = 0  # frames the decoder produced to get the window (the cost that seeking saves)
    available: int | None = None  # frames the file really decoded to, when fewer than it claimed (else None)

    def to_tensor(self) -> torch.Tensor:
        return frames_to_tensor(self.frames)


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float32 (3, T, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames))
    return x.permute(3, 0, 1, 2).float().div_(127.5).sub_(1.0)


def tensor_to_frames(video: torch.Tensor) -> np.ndarray:
    """float (3, T, H, W) in [-1, 1] -> uint8 (T, H, W, 3); values outside the range are clipped."""
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a video of shape (3, T, H, W), got {tuple(video.shape)}")
    x = ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().numpy()


def _target_size(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _resize_plan(height: int, width: int, size, crop: str, rng: np.random.Generator | None,
                 zoom: tuple[float, float] = (1.0, 1.0)):
    """Scale so that the frame covers (H, W) (the short side matches for a square target), then crop. With a
    random crop and a zoom range other than (1, 1), the covering scale is first multiplied by a factor drawn
    log-uniformly from it (the draw comes before the crop's; without a zoom none is made, so a seeded stream's
    crops stay what they were).

    Returns (resized_h, resized_w, top, left, H, W).
    """
    target = _target_size(size)
    if target is None:
        return height, width, 0, 0, height, width
    th, tw = target
    if crop not in ("center", "random"):
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    lo, hi = zoom
    if not 1.0 <= lo <= hi:
        raise ValueError(f"zoom must be (lo, hi) with 1 <= lo <= hi, got {zoom!r}")
    factor = 1.0
    if crop == "random":
        rng = rng if rng is not None else np.random.default_rng()
        if (lo, hi) != (1.0, 1.0):
            factor = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    scale = max(th / height, tw / width) * factor
    rh, rw = max(th, round(height * scale)), max(tw, round(width * scale))
    if crop == "center":
        top, left = (rh - th) // 2, (rw - tw) // 2
    else:
        top, left = int(rng.integers(0, rh - th + 1)), int(rng.integers(0, rw - tw + 1))
    return rh, rw, top, left, th, tw


def window_stride(src_fps: float, fps: float | None) -> float:
    """Source frames per output frame for a target `fps`: the file's rate over it, never below 1 (a file
    slower than the target keeps its own rate); 1 when no target is given or the rate is unknown."""
    return max(1.0, src_fps / fps) if fps and src_fps > 0 else 1.0


def last_window_start(total: int, num_frames: int, stride: float) -> int:
    """The last source frame at which a window of `num_frames` frames every `stride` frames still fits."""
    span = (num_frames - 1) * stride  # distance from the first to the last frame, in source frames
    last_start = math.floor(total - 1 - span + 1e-9)
    if last_start < 0:
        raise ClipTooShortError(
            f"needs {math.floor(span) + 1} source frames for {num_frames} frames at stride {stride:g}, has {total}"
        )
    return last_start


def _window_indices(total: int, num_frames: int, stride: float, start, rng) -> list[int]:
    """Source frame indices of a window of `num_frames` frames taken every `stride` source frames."""
    last_start = last_window_start(total, num_frames, stride)
    if start == "start":
        first = 0
    elif start == "center":
        first = last_start // 2
    elif start == "random":
        rng = rng if rng is not None else np.random.default_rng()
        first = int(rng.integers(0, last_start + 1))
    elif isinstance(start, int):
        if not 0 <= start <= last_start:
            raise ClipTooShortError(f"a window of {num_frames} frames at stride {stride:g} cannot start at frame {start} of {total}")
        first = start
    else:
        raise ValueError(f"start must be 'start', 'center', 'random' or a frame index, got {start!r}")
    return [first + int(round(i * stride)) for i in range(num_frames)]


def read_clip(
    source: Source,
    num_frames: int,
    *,
    fps: float | None = None,
    size: int | tuple[int, int] | None = None,
    start: str | int = "start",
    crop: str = "center",
    zoom: tuple[float, float] = (1.0, 1.0),
    rng: np.random.Generator | None = None,
    info: VideoInfo | None = None,
    seek: bool = True,
    threads: int = 0,
) -> Clip:
    """Read `num_frames` frames (1 + 4k) from `source`, resized and cropped to `size`.

    fps: target frame rate; the stride in source frames is the file's rate over it (never below 1,
      so a file slower than the target keeps its own rate, reported as `Clip.fps`). None: every frame.
    size: int (square) or (H, W); the frame is scaled to cover it, then cropped. None: native size.
    start: where the window begins: 'start', 'center', 'random' (uniform over all valid starts) or an index.
    crop: 'center' or 'random'.
    zoom: (lo, hi), with crop='random': scale the frame to cover `size` times a factor drawn log-uniformly
      from [lo, hi] before cropping, so that crops show the footage at several scales (1, 1: none).
    info: the shard's metadata, which saves a header read; the exact frame count comes from there.
    seek: jump to the keyframe before the window (the default) instead of decoding from frame 0.
    threads: decoder threads; 0 lets FFmpeg use one per core (right for one reader, too many for many).
    Raises ClipTooShortError when the file has too few frames, VideoReadError when it does not decode.
    """
    check_frame_count(num_frames, "num_frames")
    container = _open(source)
    try:
        stream, header, src_fps, stride, indices = _window(container, num_frames, fps, start, rng, info, threads)
        # The display orientation: the shard's record says it; otherwise the first decoded frame's display matrix
        # does, and a window planned for another orientation is read again for the right one.
        orientation = info.orientation if info is not None else ""
        state = rng.bit_generator.state if rng is not None else None
        for attempt in range(2):
            if state is not None:
                rng.bit_generator.state = state  # the same crop draws for the orientation found
            plan = _oriented_plan(header, orientation, size, crop, rng, zoom)
            try:
                frames, decoded, available = _decode_window(container, stream, indices, plan, seek, num_frames,
                                                            stride, start, rng, orientation)
                break
            except Reoriented as turned:
                orientation = turned.orientation
                container.seek(0)
        else:
            raise VideoReadError("the display matrix changes between frames")
        if available is not None:
            available, indices = available
        rh, rw, top, left, th, tw = plan[:6]
        out = np.stack([f[top : top + th, left : left + tw] for f in frames])  # (T, H, W, 3)
        eff_fps = src_fps / stride if src_fps > 0 else 0.0
        return Clip(frames=out, fps=eff_fps, start=indices[0], stride=stride, decoded=decoded, available=available)
    except av.FFmpegError as e:
        raise VideoReadError(f"decoding failed: {_reason(e)}") from e
    finally:
        container.close()


class WindowCutShort(VideoReadError):
    """`iter_clip`: the file ended before the window did (fewer frames decode than it claims); `read_clip`
    moves the window into the frames that decode."""


def _window(container, num_frames: int, fps, start, rng, info: VideoInfo | None, threads: int):
    """(stream, header, the file's rate, the stride, the window's source frame indices), the stream set up to
    decode with `threads`."""
    stream = _video_stream(container)
    header = _header_info(container, stream)
    if header.width <= 0 or header.height <= 0:
        raise VideoReadError("video stream has no frame size (not a video or image, or a corrupt one)")
    total = info.frames if info is not None and info.frames > 0 else header.frames
    src_fps = header.fps
    if _is_image_format(container):
        if num_frames != 1:
            raise ClipTooShortError(f"an image is a one-frame video; {num_frames} frames were asked for")
        total, src_fps = 1, 0.0
    stride = window_stride(src_fps, fps)
    indices = _window_indices(total, num_frames, stride, start, rng)
    stream.thread_type = "AUTO"
    if threads > 0:
        stream.codec_context.thread_count = threads
    return stream, header, src_fps, stride, indices


def iter_clip(source: Source, num_frames: int, *, fps: float | None = None, size: int | tuple[int, int] | None = None,
              start: str | int = "start", info: VideoInfo | None = None, threads: int = 0) -> Iterator[np.ndarray]:
    """`read_clip`'s window (centre-cropped), one uint8 (H, W, 3) frame at a time, decoded as it is consumed: the
    memory of one frame whatever the window's length. Raises WindowCutShort, after the frames that decoded, when
    the file ends before the window does."""
    check_frame_count(num_frames, "num_frames")
    container = _open(source)
    try:
        stream, header, _, _, indices = _window(container, num_frames, fps, start, None, info, threads)
        orientation = info.orientation if info is not None else ""
        for attempt in range(2):
            rh, rw, top, left, th, tw, (width, height) = _oriented_plan(header, orientation, size, "center", None, (1.0, 1.0))
            frames = iter_indices(container, stream, indices, width, height, True, orientation)
            try:
                first = next(frames)
            except Reoriented as turned:
                orientation = turned.orientation
                container.seek(0)
                continue
            except StreamEnded as end:
                raise WindowCutShort(f"only {end.available} frames decode") from None
            break
        else:
            raise VideoReadError("the display matrix changes between frames")
        yield first[top : top + th, left : left + tw]
        try:
            for frame in frames:
                yield frame[top : top + th, left : left + tw]
        except StreamEnded as end:
            raise WindowCutShort(f"only {end.available} frames decode") from None
    except av.FFmpegError as e:
        raise VideoReadError(f"decoding failed: {_reason(e)}") from e
    finally:
        container.close()


def _oriented_plan(header: VideoInfo, orientation: str, size, crop, rng, zoom) -> tuple:
    """The resize plan in the displayed orientation, and the (width, height) to convert stored frames to."""
    swap = orientation in SWAPS_SIDES
    height, width = (header.width, header.height) if swap else (header.height, header.width)
    rh, rw, top, left, th, tw = _resize_plan(height, width, size, crop, rng, zoom)
    return rh, rw, top, left, th, tw, (rh, rw) if swap else (rw, rh)


def _decode_window(container, stream, indices, plan, seek, num_frames, stride, start, rng, orientation):
    """(frames, decoded, None), or when fewer frames decode than the file claims, the window moved into them:
    (frames, decoded, (available, its indices))."""
    width, height = plan[6]
    try:
        frames, decoded = decode_indices(container, stream, indices, width, height, seek, orientation)
        return frames, decoded, None
    except StreamEnded as end:  # fewer frames decode than the file claims: the window moves into them
        available = end.available
        last_start = last_window_start(available, num_frames, stride)  # ClipTooShortError if none fits
        first = min(indices[0], last_start) if isinstance(start, int) else start
        indices = _window_indices(available, num_frames, stride, first, rng)
        container.seek(0)
        try:
            frames, decoded = decode_indices(container, stream, indices, width, height, False, orientation)
        except StreamEnded as again:
            raise VideoReadError(f"decoding stopped at frame {again.available}, before frame "
                                 f"{available} where it stopped the first time") from None
        return frames, decoded, (available, indices)


def read_video(source: Source, num_frames: int, **kwargs) -> torch.Tensor:
    """`read_clip(...)` as float (3, T, H, W) in [-1, 1]."""
    return read_clip(source, num_frames, **kwargs).to_tensor()


def read_image(path: Path, height: int, width: int) -> torch.Tensor:
    """An image (or a video's first frame), (3, H, W) in [-1, 1], scaled to cover the size and centre-cropped;
    one-line errors."""
    if not path.is_file():
        raise MissingInputError(f"no image at {path}")
    try:
        return read_clip(path, 1, size=(height, width)).to_tensor()[:, 0]
    except (VideoReadError, ValueError) as e:
        raise InputError(f"cannot read the image {path}: {e}") from None


def read_last_frames(path: Path, height: int, width: int, fps: float, factor: int) -> torch.Tensor:
    """The last 1 + factor * k frames of a video at `fps` (as many as it has), (3, T, H, W) in [-1, 1], scaled
    to cover the size and centre-cropped; one-line errors."""
    if not path.is_file():
        raise MissingInputError(f"no video at {path}")
    try:
        info = probe(path)
        stride = window_stride(info.fps, fps)
        available = int((info.frames - 1) // stride) + 1  # frames at the target rate
        count = 1 + (available - 1) // factor * factor
        start = last_window_start(info.frames, count, stride)
        return read_clip(path, count, fps=fps, size=(height, width), start=start, info=info).to_tensor()
    except (VideoReadError, ValueError) as e:
        raise InputError(f"cannot read the video {path}: {e}") from None
