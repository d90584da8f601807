"""Decoding a window's frames: which decoded frame each slot of a window takes (by time, so variable-rate
video is not time-warped), and how a display matrix turns it (phones). `data.video_io` reads clips with it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import av
import av.sidedata.sidedata
import numpy as np
from av.video.reformatter import VideoReformatter


class VideoReadError(RuntimeError):
    """The bytes are not a decodable video: corrupt, truncated, or not a video at all."""


def stream_fps(stream) -> float:
    """The stream's average frame rate (else its guessed or base rate; 0 when it has none)."""
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


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
    for entry in frame.side_data:  # PyAV 18.1.1 iterates the Mapping's keys (Types), earlier ones its values
        data = frame.side_data[entry] if isinstance(entry, av.sidedata.sidedata.Type) else entry
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


class Reoriented(Exception):
    """The frames' display matrix says another orientation than the window was planned for."""

    def __init__(self, orientation: str):
        super().__init__(orientation)
        self.orientation = orientation


def decode_indices(container, stream, indices: list[int], width: int, height: int, seek: bool,
                    orientation: str = "") -> tuple[list[np.ndarray], int]:
    """The frames at the sorted source indices (see `iter_indices`) and the number of frames decoded to get them."""
    frames = iter_indices(container, stream, indices, width, height, seek, orientation)
    out = []
    while True:
        try:
            out.append(next(frames))
        except StopIteration as done:
            return out, done.value


def iter_indices(container, stream, indices: list[int], width: int, height: int, seek: bool,
                  orientation: str = "") -> Iterator[np.ndarray]:
    """Decode the frames at the sorted source indices, converting only those to RGB at (height, width) as
    stored, then turning them for display (`orientation`, which the first frame's display matrix must confirm);
    yields them one by one as they decode and returns the number of frames decoded to get them.
    """
    turn = ORIENTATIONS[orientation]
    fps = stream_fps(stream)
    t0 = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    can_seek = seek and indices[0] > 0 and fps > 0 and stream.time_base is not None
    if can_seek:
        # The first frame's own timestamp, rounded to the nearest tick: a window that starts on a keyframe
        # seeks to that keyframe, not the one before. Should the demuxer still land past the frame (an
        # irregular stream), the overshoot check below decodes from the start instead.
        target = round((t0 + indices[0] / fps) / stream.time_base)
        container.seek(target, stream=stream, backward=True, any_frame=False)
    # One converter for the whole window: frame.reformat() builds a new swscale context for every frame, and reading
    # a window that way took 1.5x (real clips at 128) to 2.3x (64x64 clips) as long (bench/data.py --sections convert)
    reformatter = VideoReformatter()
    want = 0
    counted = -1
    shown = None  # [frame, its RGB once converted]: the frame on screen at the slots being filled
    last = -1.0  # position of the last frame that decoded

    def rgb_of(frame, rgb):
        if rgb is None:
            rgb = reformatter.reformat(frame, width=width, height=height, format="rgb24", interpolation="AREA").to_ndarray()
            rgb = turn(rgb)
        return rgb

    # Slot i of the window is time t0 + i / fps, and takes the frame on screen then: the last one whose timestamp
    # is at most SLOT_TOLERANCE of a slot after it (timestamps rounded to a coarse time base jitter). A
    # constant-rate file's frame i is slot i; in a variable-rate file, slots where frames are sparse repeat the
    # frame shown, and frames where they are dense are passed over, so a window is sampled by time, not by count.
    for frame in frames_until_damage(container.decode(stream)):
        counted += 1
        if counted == 0 and frame_orientation(frame) != orientation:
            raise Reoriented(frame_orientation(frame))
        if frame.time is not None and fps > 0:
            pos = (frame.time - t0) * fps
        elif not can_seek:
            pos = float(counted)  # no timestamps: count frames from the start
        else:
            pos = None
        if can_seek and counted == 0 and (pos is None or pos > indices[0] + SLOT_TOLERANCE):
            # No timestamps to place the frame, or the demuxer overshot (a bad index): decode from the start.
            container.seek(0)
            decoded = yield from iter_indices(container, stream, indices, width, height, False, orientation)
            return decoded + 1
        if pos is None:
            raise VideoReadError("a frame without a timestamp after seeking; read this file with seek=False")
        last = max(last, pos)
        while shown is not None and want < len(indices) and pos > indices[want] + SLOT_TOLERANCE:
            shown[1] = rgb_of(*shown)  # slots before this frame: the one shown until it
            yield shown[1]
            want += 1
        if want == len(indices):
            return counted + 1
        shown = [frame, None]
        # A frame within the tolerance of a slot is that slot's (a constant-rate file's frame i is slot i): taken
        # now, without decoding the next frame to learn that it comes after; so is the first frame decoded when
        # it is already past the slot.
        while want < len(indices) and (pos >= indices[want] - SLOT_TOLERANCE or counted == 0 and pos > indices[want]):
            shown[1] = rgb_of(*shown)
            yield shown[1]
            want += 1
        if want == len(indices):
            return counted + 1
    # The window was checked against the frame count, so fewer frames decode than the file holds or claims.
    if last < 0:
        raise VideoReadError("no frame decodes")
    raise StreamEnded(int(math.floor(last + 0.5)) + 1)


SLOT_TOLERANCE = 0.25  # of a frame interval at the stream's average rate


class StreamEnded(Exception):
    """Decoding ended (or broke) before a window's last frame: `available` frames decode."""

    def __init__(self, available: int):
        super().__init__(f"only {available} frames decode")
        self.available = available


def frames_until_damage(frames):
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
