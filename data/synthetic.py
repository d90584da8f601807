"""The built-in synthetic captioned video set: one object moving at constant velocity on a dark background.

    python -m data.synthetic --out DIR --num N [--frames 17 --size 64 --fps 8 --seed 0]
                             [--holdout "a red triangle moving up" ... | --holdout-default]
                             [--speed 0.45 0.65] [--object-size 0.22 0.30] [--distractor]
                             [--shapes 17x64x96 17x96x64 9x64x64 1x64x64 ...]

--size takes one side or HEIGHT WIDTH; --shapes mixes aspect ratios and durations (each clip takes one of
the FRAMESxHEIGHTxWIDTH shapes, drawn from the seed; a one-frame shape is written as a PNG image), for
training in buckets.

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

from .clip_options import add_clip_options, check_clip_options
from .shards import ShardWriter
from .video_io import check_frame_count, size_pair
from .video_write import encode_mp4

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
    size: int | tuple[int, int] = 64  # one side (square frames) or (height, width), even
    fps: float = 8.0
    speed: tuple[float, float] = (0.45, 0.65)  # distance travelled over the clip, as a fraction of the frame
    object_size: tuple[float, float] = (0.22, 0.30)  # object width, as a fraction of the frame
    distractor: bool = False  # add a second, smaller object of another colour and shape
    holdout: tuple[str, ...] = field(default_factory=tuple)  # captions never generated
    crf: int = 12  # h264 quality; low keeps the flat colours clean
    shapes: tuple[tuple[int, int, int], ...] = ()  # (frames, height, width) each clip draws from; () : frames x size

    def __post_init__(self):
        for frames, height, width in self.clip_shapes:
            check_frame_count(frames)
            if height % 2 or width % 2 or min(height, width) < 16:
                raise InputError(f"frame sides must be even and at least 16, got {height}x{width}")
        bad = [c for c in self.holdout if parse_caption(c) is None]
        if bad:
            raise InputError(f"holdout captions must follow 'a {{color}} {{shape}} moving {{direction}}': {bad}")
        if len(set(self.holdout)) >= len(ALL_CAPTIONS):
            raise InputError("the holdout covers every caption; nothing would be left to generate")

    @property
    def clip_shapes(self) -> list[tuple[int, int, int]]:
        if self.shapes:
            return [tuple(int(v) for v in s) for s in self.shapes]
        return [(self.frames, *size_pair(self.size, "size"))]

    @property
    def train_captions(self) -> list[str]:
        held = set(self.holdout)
        return [c for c in ALL_CAPTIONS if c not in held]


_SUPERSAMPLE = 4  # sub-pixels per pixel side, for anti-aliased edges


def _coverage(shape: str, cx: float, cy: float, side: float, height: int, width: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape, (height, width) float in [0, 1]."""
    s = _SUPERSAMPLE
    y = ((np.arange(height * s) + 0.5) / s)[:, None]  # sub-pixel centres
    x = ((np.arange(width * s) + 0.5) / s)[None, :]
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
    return inside.reshape(height, s, width, s).mean(axis=(1, 3))


def _trajectory(direction: str, side: float, speed: float, shape: tuple[int, int, int],
                rng: np.random.Generator) -> np.ndarray:
    """Centres (T, 2) in pixels, moving at constant velocity and staying inside a (T, H, W) frame."""
    frames, height, width = shape
    dx, dy = DIRECTIONS[direction]
    n, across_n = (width, height) if dx else (height, width)  # the frame's side along the motion, and across it
    margin = side / 2 + 1.0
    travel = min(speed * n, n - 2 * margin)
    along_start = rng.uniform(margin, max(margin, n - margin - travel))  # along the motion axis, positive sense
    across = rng.uniform(margin, across_n - margin)
    t = np.linspace(0.0, 1.0, frames)
    along = along_start + travel * t
    if dx < 0 or dy < 0:
        along = n - along  # mirror so that the object moves the negative way
    return np.stack([along, np.full_like(along, across)] if dx else [np.full_like(along, across), along], axis=1)


def render_object_track(frames: np.ndarray, shape: str, rgb, centres: np.ndarray, side: float) -> None:
    """Paint the shape into float frames (T, H, W, 3) in place, at each frame's centre."""
    color = np.asarray(rgb, dtype=np.float32)
    for f, (cx, cy) in zip(frames, centres):
        a = _coverage(shape, cx, cy, side, frames.shape[1], frames.shape[2])[..., None]
        f *= 1 - a
        f += a * color


def render_sample(caption: str, spec: SyntheticSpec, rng: np.random.Generator,
                  clip_shape: tuple[int, int, int] | None = None) -> tuple[np.ndarray, dict]:
    """Frames uint8 (T, H, W, 3) of `caption` and the ground truth as a dict; clip_shape (T, H, W) defaults to
    the spec's first."""
    clip_shape = clip_shape or spec.clip_shapes[0]
    color, shape, direction = parse_caption(caption)
    side = rng.uniform(*spec.object_size) * min(clip_shape[1:])
    speed = rng.uniform(*spec.speed)
    centres = _trajectory(direction, side, speed, clip_shape, rng)
    frames = np.empty((*clip_shape, 3), np.float32)
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
        d_centres = _trajectory(d_dir, d_side, rng.uniform(*spec.speed), clip_shape, rng)
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


def parse_shape(text: str) -> tuple[int, int, int]:
    """(frames, height, width) from FRAMESxHEIGHTxWIDTH."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise InputError(f"a shape is FRAMESxHEIGHTxWIDTH, e.g. 17x64x96; got {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def encode_png(frame: np.ndarray) -> bytes:
    """One uint8 (H, W, 3) frame as PNG bytes (PyAV's png encoder)."""
    import av

    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = frame.shape[1], frame.shape[0], "rgb24"
    packets = codec.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24"))
    packets += codec.encode(None)
    return b"".join(bytes(p) for p in packets)


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
    shapes = spec.clip_shapes
    with ShardWriter(out_dir, shard_size, overwrite) as writer:
        for i, caption in enumerate(caption_schedule(spec, num, seed)):
            clip_shape = shapes[int(np.random.default_rng([seed, i, 0x5A]).integers(len(shapes)))] if len(shapes) > 1 else shapes[0]
            frames, truth = render_sample(caption, spec, np.random.default_rng([seed, i]), clip_shape)
            image = clip_shape[0] == 1 and len(shapes) > 1  # a one-frame shape of a mix: a PNG image
            meta = {
                "fps": 0.0 if image else spec.fps,
                "frames": clip_shape[0],
                "width": clip_shape[2],
                "height": clip_shape[1],
                "duration": 0.0 if image else clip_shape[0] / spec.fps,
                "codec": "png" if image else "h264",
                "source": "synthetic",
            } | truth
            media = {"png": encode_png(frames[0])} if image else {"mp4": encode_mp4(frames, spec.fps, crf=spec.crf)}
            writer.write({"__key__": f"synth_{i:06d}", "txt": caption, "json": meta} | media)
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
    add_clip_options(parser, frames=17, size=64, fps=8.0, size_help="frame side in pixels, even, or HEIGHT WIDTH",
                     fps_help="frame rate written in the mp4")
    parser.add_argument("--shapes", nargs="+", default=[], metavar="FxHxW",
                        help="mix these (frames, height, width) shapes, one drawn per clip, e.g. 17x64x96 17x96x64 1x64x64")
    parser.add_argument("--seed", type=int, default=0, help="seed of the clips' colours, shapes, directions, speeds and noise")
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
        check_clip_options(args)
        shapes = tuple(parse_shape(s) for s in args.shapes)
        spec = SyntheticSpec(args.frames, args.size, args.fps, tuple(args.speed), tuple(args.object_size),
                             args.distractor, holdout, shapes=shapes)
        manifest = generate(args.out, args.num, spec, args.seed, args.shard_size, args.overwrite)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {manifest['samples']} clips in {len(manifest['shards'])} shards to {args.out} "
          f"({len(spec.train_captions)} caption combinations, {len(holdout)} held out)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
