"""One source video to its clips: the scenes found, each clip cut out (re-encoded, atomically) and scored, in one
decode of the source after the scene pass. Runs in a worker process; returns the manifest rows."""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import av

from checkpoint_io import write_json_atomic
from data.shards import sanitize_key
from errors import InputError
from data.video_write import video_writer

from .scenes import SourceSkipped, detect_scenes, plan_clips
from .scores import SCORE_NAMES, analysis_gray, frames_needed, ocr_frame, score_clip, text_area, text_positions


@dataclass(frozen=True)
class CutOptions:
    detector: str = "content"
    threshold: float | None = None
    min_frames: int = 17
    max_frames: int = 161
    trim: int = 2
    crf: int = 18

    def fingerprint(self) -> str:
        """What a finished source's clips were made with, and which scores they have: a rerun with other cut
        options, or after a score was added, redoes them."""
        return hashlib.sha256(repr((sorted(asdict(self).items()), SCORE_NAMES)).encode()).hexdigest()[:16]


def source_key(name: str) -> str:
    """A source's folder and clip-name stem: its relative path made safe, with a short hash so that `a/b.mp4` and
    `a_b.mp4` stay apart."""
    return f"{sanitize_key(name)[:80]}-{hashlib.sha256(name.encode()).hexdigest()[:6]}"


def cut_and_score(path: Path, name: str, clips_dir: Path, options: CutOptions) -> dict:
    """{"rows": one per clip, "scenes": how many, "too_short": scenes too short for a clip, "frames": the source's,
    "seconds": {"detect", "cut", "score", "text"}: the time each stage took}. Raises av.error.FFmpegError / scenedetect's
    VideoOpenFailure / ValueError for a video that cannot be read, SourceSkipped for one that is not footage."""
    seconds = {"detect": 0.0, "cut": 0.0, "score": 0.0, "text": 0.0}
    t0 = time.perf_counter()
    scenes, total, fps = detect_scenes(path, options.detector, options.threshold)
    seconds["detect"] = time.perf_counter() - t0
    clips, too_short = plan_clips(scenes, options.min_frames, options.max_frames, options.trim)
    key = source_key(name)
    rows = []
    if clips:
        t0 = time.perf_counter()
        rows = _cut(path, name, key, clips, clips_dir, fps, options.crf, seconds)
        seconds["cut"] = time.perf_counter() - t0 - seconds["score"] - seconds["text"]
    return {"rows": rows, "scenes": len(scenes), "too_short": too_short, "frames": total,
            "seconds": {k: round(v, 4) for k, v in seconds.items()}}


def _cut(path, name, key, clips, clips_dir: Path, fps: float, crf: int, seconds: dict) -> list[dict]:
    rows = []
    out_dir = clips_dir / key
    out_dir.mkdir(parents=True, exist_ok=True)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = container.decode(stream)
        index = 0
        for clip in clips:
            need = {clip.start + p for p in frames_needed(clip.frames)}
            text_at = {clip.start + p for p in text_positions(clip.frames)}
            gray, text_frames = {}, []
            clip_path = out_dir / f"{key}_{clip.start:06d}-{clip.end:06d}.mp4"
            with contextlib.ExitStack() as stack:  # the clip's file appears whole, or not at all on an error
                writer = None
                for frame in frames:
                    if index >= clip.start:
                        rgb = frame.to_ndarray(format="rgb24")
                        if writer is None:
                            writer = stack.enter_context(video_writer(clip_path, rgb.shape[1], rgb.shape[0], fps,
                                                                      crf=crf))
                        writer(rgb[None])
                        if index in need:
                            t0 = time.perf_counter()
                            gray[index - clip.start] = analysis_gray(rgb)
                            seconds["score"] += time.perf_counter() - t0
                        if index in text_at:
                            text_frames.append(ocr_frame(rgb))
                    index += 1
                    if index >= clip.end:
                        break
            if index < clip.end:  # the file held fewer frames than its header said
                clip_path.unlink(missing_ok=True)
                break
            t0 = time.perf_counter()
            scores = score_clip(gray, clip.frames)
            seconds["score"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            scores["text_area"] = text_area(text_frames)
            seconds["text"] += time.perf_counter() - t0
            rows.append({
                "clip": f"clips/{key}/{clip_path.name}", "source": name, "start_frame": clip.start,
                "end_frame": clip.end, "frames": clip.frames, "fps": round(fps, 4),
                "start_s": round(clip.start / fps, 3), "end_s": round(clip.end / fps, 3),
                "width": rgb.shape[1], "height": rgb.shape[0],
            } | scores)
    return rows


def work_file(out: Path, name: str) -> Path:
    """Where a finished source's record lies: its rows, and the cut options they were made with."""
    return out / "work" / f"{source_key(name)}.json"


# in this module, not in __main__: a worker process started by spawn imports it by name (a function of the
# `python -m data.curate` main module pickles as __main__'s, which a spawned worker cannot find)
def process(job: tuple) -> tuple[str, dict]:
    """Cut and score one source in a worker; a video that cannot be read is a counted skip, never a stop."""
    path, name, out, options = job
    try:
        result = cut_and_score(path, name, out / "clips", options)
    except InputError:
        raise
    except SourceSkipped as e:
        result = {"error": str(e)}
    except Exception as e:  # noqa: BLE001 - PyAV, PySceneDetect and OpenCV each raise their own kinds for bad files
        result = {"error": f"unreadable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()}
    record = {"source": name, "options": options.fingerprint()} | result
    write_json_atomic(work_file(out, name), record)
    return name, record
