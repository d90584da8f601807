"""A folder of generated videos, as `sample.py --out DIR` and `evaluation.generator` write it: NAME.mp4 with its
prompt in NAME.txt. Light on purpose (no torch): the preference server starts from it in a fraction of a second."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from errors import InputError


@dataclass
class Generated:
    name: str
    caption: str
    path: Path


def read_caption(path: Path) -> str:
    """NAME.txt's prompt; a file that is not UTF-8 is the user's to fix, named with where it broke."""
    try:
        return path.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text (byte {e.start}): save the prompt as UTF-8") from None


def find_generated(folder: str | Path) -> list[Generated]:
    """Every NAME.mp4 in `folder` with its NAME.txt caption; a video without one is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder of generated videos (NAME.mp4 + NAME.txt)")
    videos = sorted(folder.glob("*.mp4"))
    if not videos:
        raise InputError(f"no NAME.mp4 videos in {folder}: sample.py --out {folder} writes them with their captions")
    missing = [v.name for v in videos if not v.with_suffix(".txt").is_file()]
    if missing:
        raise InputError(f"{len(missing)} of {len(videos)} videos in {folder} have no caption beside them (first: "
                         f"{missing[0]} without {Path(missing[0]).stem}.txt): every video needs its prompt in NAME.txt")
    return [Generated(v.stem, read_caption(v.with_suffix(".txt")), v) for v in videos]
