"""Scene cuts: where a source video's shots begin and end, and the clips cut from them.

PySceneDetect finds the cuts (its content detector: a jump in hue, saturation and luma between frames; or its
adaptive detector: a jump large against the frames around it, which keeps fast camera moves from reading as cuts).
`plan_clips` turns the scenes into clips: a few frames trimmed on each side of a cut (a dissolve or the encoder's
smear across a cut would otherwise open the clip), scenes shorter than the minimum dropped, and scenes longer than
the maximum split into windows of at most that length.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from errors import InputError

DETECTORS = ("content", "adaptive")
CUT_LEVEL = 27.0  # content change (mean HSV difference, 0-255) that reads as a cut: PySceneDetect's default
MAX_CUT_RATE = 0.5  # a source where more frames than this change like a cut is noise or strobing, not footage


class SourceSkipped(Exception):
    """A readable source that gives no usable clips for a reason to report (not a bug)."""


@dataclass(frozen=True)
class Span:
    start: int  # first frame, counted in decode order from 0
    end: int    # one past the last frame

    @property
    def frames(self) -> int:
        return self.end - self.start


def _scenedetect():
    try:
        import scenedetect
    except ImportError:
        raise InputError("scene detection needs PySceneDetect and OpenCV: pip install -e '.[curate]'") from None
    return scenedetect


def detect_scenes(path: Path, detector: str = "content", threshold: float | None = None,
                  min_scene_frames: int = 8) -> tuple[list[Span], int, float]:
    """(the scenes of the video at `path`, its frame count, its fps). A video without a cut is one scene.

    `threshold` is the detector's own (content: 27 by default, the mean change of HSV in 0-255 that counts as a
    cut; adaptive: 3, the change as a multiple of its neighbours'). Raises `scenedetect.VideoOpenFailure` for a
    file that cannot be opened."""
    sd = _scenedetect()
    if detector not in DETECTORS:
        raise InputError(f"--detector {detector!r}: choose one of {', '.join(DETECTORS)}")
    # suppress_output: else PySceneDetect hands ffmpeg's log to stderr for the rest of the process (every encode
    # after it would print its statistics)
    video = sd.open_video(str(path), backend="pyav", suppress_output=True)
    if detector == "content":
        det = sd.ContentDetector(threshold=27.0 if threshold is None else threshold, min_scene_len=min_scene_frames)
    else:
        det = sd.AdaptiveDetector(adaptive_threshold=3.0 if threshold is None else threshold,
                                  min_scene_len=min_scene_frames)
    stats = sd.StatsManager()
    manager = sd.SceneManager(stats)
    manager.add_detector(det)
    total = manager.detect_scenes(video)
    # the detectors merge cuts closer than min_scene_frames, so a cut at every frame comes back as one long scene:
    # counted here from the per-frame content change the detector recorded
    changes = [stats.get_metrics(i, ["content_val"])[0] for i in range(1, total)]
    jumps = sum(1 for v in changes if v is not None and v >= CUT_LEVEL)
    if total > 1 and jumps > MAX_CUT_RATE * (total - 1):
        raise SourceSkipped(f"{jumps} of its {total - 1} frame changes are as large as a cut: noise, strobing or "
                            f"a slideshow of single frames, not footage")
    scenes = [Span(a.frame_num, b.frame_num) for a, b in manager.get_scene_list(start_in_scene=True)]
    if not scenes and total > 0:
        scenes = [Span(0, total)]
    return scenes, total, float(video.frame_rate)


def plan_clips(scenes: list[Span], min_frames: int, max_frames: int, trim: int) -> tuple[list[Span], int]:
    """(the clips cut from `scenes`, how many scenes were too short to give one).

    Each scene loses `trim` frames at each end that meets a cut (not at the video's first and last frame); what is
    left, if at least `min_frames` long, is split into the fewest windows of at most `max_frames`, of equal length
    (the remainder going to the first ones), so no window is a stub."""
    if min_frames < 1 or max_frames < min_frames:
        raise InputError(f"clip lengths: need 1 <= --min-frames ({min_frames}) <= --max-frames ({max_frames})")
    if not scenes:
        return [], 0
    first, last = scenes[0].start, scenes[-1].end
    clips, too_short = [], 0
    for s in scenes:
        start = s.start + (trim if s.start > first else 0)
        end = s.end - (trim if s.end < last else 0)
        n = end - start
        if n < min_frames:
            too_short += 1
            continue
        pieces = -(-n // max_frames)
        base, extra = divmod(n, pieces)
        for i in range(pieces):
            length = base + (1 if i < extra else 0)
            if length >= min_frames:
                clips.append(Span(start, start + length))
            start += length
    return clips, too_short
