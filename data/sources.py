"""The videos under a path (a folder searched recursively, one file, or shards) and evenly spaced windows in
them: what the evaluation commands read, the same way for a tokenizer's originals and a generator's reference;
and the name a generated video gets in a folder of them (NAME.mp4 beside its prompt in NAME.txt), one rule for
every command that writes such a folder (sample.py, evaluation.generator) and every one that reads it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .tar_reader import iter_shard_samples, media_member
from .video_io import MEDIA_EXTENSIONS, VideoInfo, VideoReadError, last_window_start, probe, window_stride


def video_name(prompt: str, seed: int | None = None, limit: int = 60) -> str:
    """The file stem of a generated video: the prompt's runs of letters and digits joined by underscores (at
    most `limit` characters), then `_SEED` when a seed is given. It holds no path separator and no dot, so no
    prompt can name a file outside the output folder."""
    stem = re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:limit].strip("_") or "video"
    return stem if seed is None else f"{stem}_{seed}"


@dataclass
class VideoSource:
    name: str
    data: bytes | Path
    info: VideoInfo
    caption: str | None = None  # the shard's .txt member, where there is one


def find_videos(path: str | Path) -> tuple[list[VideoSource], list[tuple[str, str]]]:
    """The videos under `path` and the (name, reason) of those that cannot be read."""
    path = str(path)
    p = Path(path)
    videos, skipped = [], []
    is_shards = (p.is_dir() and any(p.glob("*.tar"))) or not p.exists()  # not a path: a glob or brace pattern
    if is_shards:
        for sample in iter_shard_samples(path):
            ext = media_member(sample)
            if ext is None:
                skipped.append((sample["__key__"], "no video member"))
                continue
            try:
                meta = json.loads(sample["json"]) if "json" in sample else {}
                info = (VideoInfo.from_meta(meta) if isinstance(meta, dict) else None) or probe(sample[ext])
            except (VideoReadError, ValueError) as e:
                skipped.append((sample["__key__"], str(e)))
                continue
            try:
                caption = sample["txt"].decode("utf-8").strip() if isinstance(sample.get("txt"), bytes) else None
            except UnicodeDecodeError:
                caption = None  # not text: the video is still measured, with no caption to show beside it
            videos.append(VideoSource(sample["__key__"], sample[ext], info, caption))
        return videos, skipped
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.suffix.lower().lstrip(".") in MEDIA_EXTENSIONS)
    for f in files:
        name = f.name if p.is_file() else f.relative_to(p).as_posix()
        try:
            videos.append(VideoSource(name, f, probe(f)))
        except VideoReadError as e:
            skipped.append((name, str(e)))
    return videos, skipped


def window_starts(info: VideoInfo, frames: int, fps: float | None, windows: int) -> list[int]:
    """Evenly spaced first frames of `windows` windows (fewer if the video is short)."""
    last = last_window_start(info.frames, frames, window_stride(info.fps, fps))
    return sorted({round(i * last / max(1, windows - 1)) for i in range(windows)}) if windows > 1 else [last // 2]
