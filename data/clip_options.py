"""The clip options of every command that reads video: --frames, --size, --fps and --buckets.

One spelling, one help and one check for all of them, so that `train.py --frames 16`, `python -m tokenizer.encode
--frames 16` and `python -m data.check_shards --frames 16` fail with the same line, and a clip shape that one command
takes, the next one in the chain takes too. Each command adds the options it has (`add_clip_options`) and checks
them before it loads anything (`check_clip_options`), which also turns --size into (height, width).
"""

from __future__ import annotations

import argparse
import math

from errors import InputError

from .buckets import parse_buckets
from .video_io import check_frame_count, size_pair

FRAMES_HELP = "frames per clip, 1 + 4k"
SIZE_HELP = "crop size in pixels: one side (a square) or HEIGHT WIDTH, e.g. --size 48 80"
FPS_HELP = "target frame rate: clips are resampled to it (default: each file's own)"
BUCKETS_HELP = ("(frames, height, width) buckets instead of one --frames x --size: a preset (64p, 256p, 480p) or a file "
                "of 'frames height width [batch]' lines; each clip goes to the bucket nearest its aspect ratio whose "
                "duration it fills, images to one-frame buckets")


def add_clip_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, frames: int | None = 17,
                     size: int | None = 64, fps: float | None = None, buckets: bool = False,
                     frames_help: str = FRAMES_HELP, size_help: str = SIZE_HELP, fps_help: str = FPS_HELP,
                     buckets_help: str = BUCKETS_HELP, with_frames: bool = True, with_size: bool = True) -> None:
    """Add --frames, --size and --fps (and --buckets when `buckets`) to a parser or an argument group.

    A default of None means the command takes the value from elsewhere (a run's training clips, each file's own rate);
    `with_frames=False` / `with_size=False` leave an option out for a command that has no use for it.
    """
    if with_frames:
        parser.add_argument("--frames", type=int, default=frames, help=_with_default(frames_help, frames))
    if with_size:
        parser.add_argument("--size", type=int, nargs="+", default=size, metavar="PX",
                            help=_with_default(size_help, size))
    parser.add_argument("--fps", type=float, default=fps, help=_with_default(fps_help, fps))
    if buckets:
        parser.add_argument("--buckets", default=None, metavar="PRESET|FILE", help=buckets_help)


def _with_default(text: str, default) -> str:
    # argparse fills in %(default)s; a parser with ArgumentDefaultsHelpFormatter then adds no second one.
    return text if default is None or "(default" in text else f"{text} (default: %(default)s)"


def check_clip_options(args: argparse.Namespace) -> None:
    """Check the clip options `args` has, in place: one line naming the option and what to give instead.

    --frames must be 1 + 4k, --size one or two positive sides (stored as (height, width) from here on), --fps a
    positive, finite rate, --buckets a preset or a readable bucket file. Options left at None are not checked.
    """
    frames = getattr(args, "frames", None)
    if frames is not None:
        check_frame_count(frames, "--frames")
    if getattr(args, "size", None) is not None:
        args.size = size_pair(args.size)
    fps = getattr(args, "fps", None)
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise InputError(f"--fps must be a positive frame rate (e.g. 8, 24 or 29.97), got {fps:g}")
    if getattr(args, "buckets", None):
        parse_buckets(args.buckets, max(1, getattr(args, "batch_size", 1) or 1))
