"""The built-in synthetic captioned video set: one object moving at constant velocity on a dark background.

    python -m data.synthetic --out DIR --num N [--frames 17 --size 64 --fps 8 --seed 0]
                             [--holdout "a red triangle moving up" ... | --holdout-default]
                             [--speed 0.45 0.65] [--object-size 0.22 0.30] [--distractor]

Captions follow `a {color} {shape} moving {direction}`. The truth is known and stored in each
sample's `KEY.json`: the object's centre in every frame, its size, colour and shape, so that the
quickstart, the tests and the motion benchmark can check what a model generates. Shards are ordinary
ones (`KEY.mp4`, `KEY.txt`, `KEY.json`) that `make_loader` reads like any others.

Geometry: pixel (i, j) covers [j, j+1) x [i, i+1), so its centre is (j + 0.5, i + 0.5) in (x, y);
centres in the json use that continuous frame, x to the right and y downwards.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from checkpoint_io import write_json_atomic
from errors import InputError

from .shards import ShardWriter
from .video_io import check_frame_count, encode_mp4

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 70),
    "blue": (50, 100, 245),
    "yellow": (235, 220, 40),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUND = (16, 16, 24)

# Held out by --holdout-default (and by the quickstart): each colour, shape and direction still appears
# in training in other combinations, so generating these tests composition.
DEFAULT_HOLDOUT = (
    "a red triangle moving up",
    "a green circle moving left",
    "a blue square moving down",
    "a yellow triangle moving right",
    "a white circle moving up",
)


def make_caption(color: str, shape: str, direction: str) -> str:
    return f"a {color} {shape} moving {direction}"


def parse_caption(caption: str) -> tuple[str, str, str] | None:
    """(color, shape, direction) of a caption in the synthetic grammar, or None if it is not one."""
    words = caption.strip().lower().split()
    if len(words) != 5 or words[0] != "a" or words[3] != "moving":
        return None
    color, shape, direction = words[1], words[2], words[4]
    if color in COLORS and shape in SHAPES and direction in DIRECTIONS:
        return color, shape, direction
    return None


ALL_CAPTIONS = tuple(make_caption(*c) for c in itertools.product(COLORS, SHAPES, DIRECTIONS))


@dataclass
class SyntheticSpec:
    frames: int = 17  # 1 + 4k
    size: int = 64  # square frames, even
    fps: float = 8.0
    speed: tuple[float, float] = (0.45, 0.65)  # distance travelled over the clip, as a fraction of the frame
    object_size: tuple[float, float] = (0.22, 0.30)  # object width, as a fraction of the frame
    distractor: bool = False  # add a second, smaller object of another colour and shape
    holdout: tuple[str, ...] = field(default_factory=tuple)  # captions never generated
    crf: int = 12  # h264 quality; low keeps the flat colours clean

    def __post_init__(self):
        check_frame_count(self.frames)
        if self.size % 2 or self.size < 16:
            raise InputError(f"size must be even and at least 16, got {self.size}")
        bad = [c for c in self.holdout if parse_caption(c) is None]
        if bad:
            raise InputError(f"holdout captions must follow 'a {{color}} {{shape}} moving {{direction}}': {bad}")
        if len(set(self.holdout)) >= len(ALL_CAPTIONS):
            raise InputError("the holdout covers every caption; nothing would be left to generate")

    @property
    def train_captions(self) -> list[str]:
        held = set(self.holdout)
        return [c for c in ALL_CAPTIONS if c not in held]


_SUPERSAMPLE = 4  # sub-pixels per pixel side, for anti-aliased edges


def _coverage(shape: str, cx: float, cy: float, side: float, size: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape, (size, size) float in [0, 1]."""
    s = _SUPERSAMPLE
    coords = (np.arange(size * s) + 0.5) / s  # sub-pixel centres
    y, x = coords[:, None], coords[None, :]
    half = side / 2
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    elif shape == "square":
        inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    elif shape == "triangle":  # pointing up, base and height equal to `side`, centred on its bounding box
        top = cy - half
        inside = (y >= top) & (y <= cy + half) & (np.abs(x - cx) <= (y - top) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return inside.reshape(size, s, size, s).mean(axis=(1, 3))


def _trajectory(direction: str, side: float, speed: float, spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    """Centres (T, 2) in pixels, moving at constant velocity and staying inside the frame."""
    n = spec.size
    margin = side / 2 + 1.0
    travel = min(speed * n, n - 2 * margin)
    dx, dy = DIRECTIONS[direction]
    along_start = rng.uniform(margin, n - margin - travel)  # along the motion axis, in the positive sense
    across = rng.uniform(margin, n - margin)
    t = np.linspace(0.0, 1.0, spec.frames)
    along = along_start + travel * t
    if dx < 0 or dy < 0:
        along = n - along  # mirror so that the object moves the negative way
    return np.stack([along, np.full_like(along, across)] if dx else [np.full_like(along, across), along], axis=1)


def render_object_track(frames: np.ndarray, shape: str, rgb, centres: np.ndarray, side: float) -> None:
    """Paint the shape into float frames (T, H, W, 3) in place, at each frame's centre."""
    color = np.asarray(rgb, dtype=np.float32)
    for f, (cx, cy) in zip(frames, centres):
        a = _coverage(shape, cx, cy, side, frames.shape[1])[..., None]
        f *= 1 - a
        f += a * color


def render_sample(caption: str, spec: SyntheticSpec, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Frames uint8 (T, H, W, 3) of `caption` and the ground truth as a dict."""
    color, shape, direction = parse_caption(caption)
    side = rng.uniform(*spec.object_size) * spec.size
    speed = rng.uniform(*spec.speed)
    centres = _trajectory(direction, side, speed, spec, rng)
    frames = np.empty((spec.frames, spec.size, spec.size, 3), np.float32)
    frames[:] = np.asarray(BACKGROUND, np.float32)
    truth = {
        "caption": caption,
        "color": color,
        "rgb": list(COLORS[color]),
        "shape": shape,
        "direction": direction,
        "size": round(float(side), 3),
        "centers": np.round(centres, 3).tolist(),
        "background": list(BACKGROUND),
    }
    if spec.distractor:
        d_color = rng.choice([c for c in COLORS if c != color])
        d_shape = rng.choice([s for s in SHAPES if s != shape])
        d_dir = rng.choice(list(DIRECTIONS))
        d_side = side * 0.6
        d_centres = _trajectory(d_dir, d_side, rng.uniform(*spec.speed), spec, rng)
        render_object_track(frames, d_shape, COLORS[d_color], d_centres, d_side)  # painted first: underneath
        truth["distractor"] = {
            "color": str(d_color),
            "shape": str(d_shape),
            "direction": str(d_dir),
            "size": round(float(d_side), 3),
            "centers": np.round(d_centres, 3).tolist(),
        }
    render_object_track(frames, shape, COLORS[color], centres, side)
    return np.clip(np.round(frames), 0, 255).astype(np.uint8), truth


def caption_schedule(spec: SyntheticSpec, num: int, seed: int) -> list[str]:
    """Captions for samples 0..num-1: every training caption once per cycle, in a shuffled order."""
    captions = spec.train_captions
    rng = np.random.default_rng([seed, 0x5EED])
    out: list[str] = []
    while len(out) < num:
        out.extend(captions[i] for i in rng.permutation(len(captions)))
    return out[:num]


def generate(out_dir: str | Path, num: int, spec: SyntheticSpec | None = None, seed: int = 0, shard_size: int = 100,
             overwrite: bool = False) -> dict:
    """Write `num` synthetic samples as shards in `out_dir`, plus `manifest.json`; return the manifest. A folder
    that holds anything is refused unless `overwrite` (see ShardWriter)."""
    spec = spec or SyntheticSpec()
    if num < 1:
        raise InputError(f"num must be at least 1, got {num}")
    out_dir = Path(out_dir)
    counts: dict[str, int] = {}
    with ShardWriter(out_dir, shard_size, overwrite) as writer:
        for i, caption in enumerate(caption_schedule(spec, num, seed)):
            frames, truth = render_sample(caption, spec, np.random.default_rng([seed, i]))
            meta = {
                "fps": spec.fps,
                "frames": spec.frames,
                "width": spec.size,
                "height": spec.size,
                "duration": spec.frames / spec.fps,
                "codec": "h264",
                "source": "synthetic",
            } | truth
            writer.write({"__key__": f"synth_{i:06d}", "mp4": encode_mp4(frames, spec.fps, crf=spec.crf), "txt": caption, "json": meta})
            counts[caption] = counts.get(caption, 0) + 1
    manifest = {
        "samples": num,
        "shards": [p.name for p in writer.shards],
        "seed": seed,
        "spec": asdict(spec),
        "train_captions": spec.train_captions,
        "holdout_captions": list(spec.holdout),
        "caption_counts": counts,
    }
    write_json_atomic(out_dir / "manifest.json", manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder for the shards")
    parser.add_argument("--num", type=int, required=True, help="number of clips")
    parser.add_argument("--frames", type=int, default=17, help="frames per clip, 1 + 4k (default 17)")
    parser.add_argument("--size", type=int, default=64, help="frame side in pixels, even (default 64)")
    parser.add_argument("--fps", type=float, default=8.0, help="frame rate written in the mp4 (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=100, help="samples per shard (default 100)")
    parser.add_argument("--overwrite", action="store_true", help="replace the shards and manifest of a non-empty --out")
    parser.add_argument("--speed", type=float, nargs=2, default=(0.45, 0.65), metavar=("MIN", "MAX"),
                        help="distance travelled over the clip, as a fraction of the frame")
    parser.add_argument("--object-size", type=float, nargs=2, default=(0.22, 0.30), metavar=("MIN", "MAX"),
                        help="object width as a fraction of the frame")
    parser.add_argument("--distractor", action="store_true", help="add a second, smaller object")
    parser.add_argument("--holdout", action="append", default=[], metavar="CAPTION",
                        help="a caption combination never generated (repeatable), e.g. 'a red triangle moving up'")
    parser.add_argument("--holdout-default", action="store_true",
                        help=f"hold out the standard set: {'; '.join(DEFAULT_HOLDOUT)}")
    args = parser.parse_args(argv)
    holdout = tuple(dict.fromkeys(args.holdout + (list(DEFAULT_HOLDOUT) if args.holdout_default else [])))
    try:
        spec = SyntheticSpec(args.frames, args.size, args.fps, tuple(args.speed), tuple(args.object_size),
                             args.distractor, holdout)
        manifest = generate(args.out, args.num, spec, args.seed, args.shard_size, args.overwrite)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {manifest['samples']} clips in {len(manifest['shards'])} shards to {args.out} "
          f"({len(spec.train_captions)} caption combinations, {len(holdout)} held out)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
