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
from typing import Union

import av
from av.video.reformatter import VideoReformatter
import numpy as np
import torch

from errors import InputError, MissingInputError

Source = Union[str, os.PathLike, bytes]

VIDEO_EXTENSIONS = ("mp4", "avi", "mov", "mkv", "webm", "m4v", "mpg", "mpeg", "ts", "gif")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "webp")
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS


class VideoReadError(RuntimeError):
    """The bytes are not a decodable video: corrupt, truncated, or not a video at all."""


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


def _stream_fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _header_info(container, stream) -> VideoInfo:
    if _is_image_format(container):
        return VideoInfo(0.0, 1, stream.width, stream.height, 0.0, stream.codec_context.name)
    fps = _stream_fps(stream)
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    else:
        duration = 0.0
    frames = stream.frames or (int(round(duration * fps)) if fps > 0 else 0)
    return VideoInfo(fps, frames, stream.width, stream.height, duration, stream.codec_context.name)


# What a display matrix asks of the stored frame, as FFmpeg's command line applies it (autorotate), on an
# (H, W, 3) array. Phones store a portrait clip as landscape frames and a matrix that turns them.
ORIENTATIONS = {
    "": lambda a: a,
    "rot90": lambda a: np.rot90(a, 1),  # a quarter turn counterclockwise
    "rot270": lambda a: np.rot90(a, -1),  # a quarter turn clockwise
    "rot180": lambda a: a[::-1, ::-1],
    "hflip": lambda a: a[:, ::-1],
    "vflip": lambda a: a[::-1],
    "transpose": lambda a: a.swapaxes(0, 1),
    "antitranspose": lambda a: np.rot90(a, -1)[::-1],
}
SWAPS_SIDES = {"rot90", "rot270", "transpose", "antitranspose"}


def frame_orientation(frame) -> str:
    """The ORIENTATIONS key of a decoded frame's display matrix ("" without one, or for a turn that is not a
    multiple of 90 degrees), decided as FFmpeg's autorotate decides it."""
    matrix = None
    for data in frame.side_data:
        if data.type == av.sidedata.sidedata.Type.DISPLAYMATRIX:
            matrix = np.frombuffer(bytes(data), dtype=np.int32)
    if matrix is None or len(matrix) != 9:
        return ""
    m = [float(v) for v in matrix]
    s0, s1 = math.hypot(m[0], m[3]), math.hypot(m[1], m[4])
    if s0 == 0 or s1 == 0:
        return ""
    clockwise = round(math.degrees(math.atan2(m[1] / s1, m[0] / s0))) % 360  # FFmpeg's get_rotation
    if abs(clockwise - 90) < 1:
        return "transpose" if m[3] > 0 else "rot270"
    if abs(clockwise - 270) < 1:
        return "antitranspose" if m[3] < 0 else "rot90"
    if abs(clockwise - 180) < 1:
        return {(True, True): "rot180", (True, False): "hflip", (False, True): "vflip"}.get((m[0] < 0, m[4] < 0), "")
    return "vflip" if clockwise == 0 and m[4] < 0 else ""


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
            except _Reoriented as turned:
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
        frames, decoded = _decode_indices(container, stream, indices, width, height, seek, orientation)
        return frames, decoded, None
    except _StreamEnded as end:  # fewer frames decode than the file claims: the window moves into them
        available = end.available
        last_start = last_window_start(available, num_frames, stride)  # ClipTooShortError if none fits
        first = min(indices[0], last_start) if isinstance(start, int) else start
        indices = _window_indices(available, num_frames, stride, first, rng)
        container.seek(0)
        try:
            frames, decoded = _decode_indices(container, stream, indices, width, height, False, orientation)
        except _StreamEnded as again:
            raise VideoReadError(f"decoding stopped at frame {again.available}, before frame "
                                 f"{available} where it stopped the first time") from None
        return frames, decoded, (available, indices)


class _Reoriented(Exception):
    """The frames' display matrix says another orientation than the window was planned for."""

    def __init__(self, orientation: str):
        super().__init__(orientation)
        self.orientation = orientation


def _decode_indices(container, stream, indices: list[int], width: int, height: int, seek: bool,
                    orientation: str = "") -> tuple[list[np.ndarray], int]:
    """Decode the frames at the sorted source indices, converting only those to RGB at (height, width) as
    stored, then turning them for display (`orientation`, which the first frame's display matrix must confirm).

    Returns the frames and the number of frames decoded to get them.
    """
    turn = ORIENTATIONS[orientation]
    fps = _stream_fps(stream)
    t0 = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    can_seek = seek and indices[0] > 0 and fps > 0 and stream.time_base is not None
    if can_seek:
        # The first frame's own timestamp, rounded to the nearest tick: a window that starts on a keyframe
        # seeks to that keyframe, not the one before. Should the demuxer still land past the frame (an
        # irregular stream), the overshoot check below decodes from the start instead.
        target = round((t0 + indices[0] / fps) / stream.time_base)
        container.seek(target, stream=stream, backward=True, any_frame=False)
    out: list[np.ndarray] = []
    # One converter for the whole window: frame.reformat() builds a new swscale context for every frame, and reading
    # a window that way took 1.5x (real clips at 128) to 2.3x (64x64 clips) as long (bench/data.py --sections convert)
    reformatter = VideoReformatter()
    want = 0
    counted = -1
    shown = None  # (position, frame, its RGB once converted): the frame on screen at the slots being filled
    last = -1.0  # position of the last frame that decoded

    def take(frame, rgb):
        if rgb is None:
            rgb = reformatter.reformat(frame, width=width, height=height, format="rgb24", interpolation="AREA").to_ndarray()
            rgb = turn(rgb)
        out.append(rgb)
        return rgb

    # Slot i of the window is time t0 + i / fps, and takes the frame on screen then: the last one whose timestamp
    # is at most SLOT_TOLERANCE of a slot after it (timestamps rounded to a coarse time base jitter). A constant-rate file's frame i is slot i; in a variable-rate file, slots
    # where frames are sparse repeat the frame shown, and frames where they are dense are passed over, so a window
    # is sampled by time, not by frame count.
    for frame in _frames_until_damage(container.decode(stream)):
        counted += 1
        if counted == 0 and frame_orientation(frame) != orientation:
            raise _Reoriented(frame_orientation(frame))
        if frame.time is not None and fps > 0:
            pos = (frame.time - t0) * fps
        elif not can_seek:
            pos = float(counted)  # no timestamps: count frames from the start
        else:
            pos = None
        if can_seek and counted == 0 and (pos is None or pos > indices[0] + SLOT_TOLERANCE):
            # No timestamps to place the frame, or the demuxer overshot (a bad index): decode from the start.
            container.seek(0)
            frames, decoded = _decode_indices(container, stream, indices, width, height, False, orientation)
            return frames, decoded + 1
        if pos is None:
            raise VideoReadError("a frame without a timestamp after seeking; read this file with seek=False")
        last = max(last, pos)
        while shown is not None and want < len(indices) and pos > indices[want] + SLOT_TOLERANCE:
            shown[2] = take(shown[1], shown[2])  # slots before this frame: the one shown until it
            want += 1
        if want == len(indices):
            return out, counted + 1
        shown = [pos, frame, None]
        # A frame within the tolerance of a slot is that slot's (a constant-rate file's frame i is slot i): taken
        # now, without decoding the next frame to learn that it comes after; so is the first frame decoded when
        # it is already past the slot.
        while want < len(indices) and (pos >= indices[want] - SLOT_TOLERANCE or counted == 0 and pos > indices[want]):
            shown[2] = take(frame, shown[2])
            want += 1
        if want == len(indices):
            return out, counted + 1
    # The window was checked against the frame count, so fewer frames decode than the file holds or claims.
    if last < 0:
        raise VideoReadError("no frame decodes")
    raise _StreamEnded(int(math.floor(last + 0.5)) + 1)


SLOT_TOLERANCE = 0.25  # of a frame interval at the stream's average rate


class _StreamEnded(Exception):
    """Decoding ended (or broke) before a window's last frame: `available` frames decode."""

    def __init__(self, available: int):
        super().__init__(f"only {available} frames decode")
        self.available = available


def _frames_until_damage(frames):
    """The decoder's frames, ending quietly at damage after the first (a truncated or broken last frame):
    what decoded before it is good, and the caller learns where it stopped."""
    first = True
    while True:
        try:
            frame = next(frames)
        except StopIteration:
            return
        except av.FFmpegError:
            if first:
                raise
            return
        first = False
        yield frame


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
