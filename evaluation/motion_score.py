"""The motion benchmark: score generated videos of the synthetic grammar against their captions.

    python -m evaluation.motion_score DIR [--manifest SHARDS/manifest.json] [--json OUT.json]

Every `NAME.mp4` in DIR is scored against the caption in `NAME.txt` (`a {color} {shape} moving {direction}`).
The object is found from the pixels alone: the background is the frame's median colour, the foreground
the pixels far from it, and the object its largest connected component. Per video:

- presence: fraction of frames with exactly one object of plausible size (0.5% to 25% of the frame);
- colour: the object's mean colour, seen from the background's, points nearest to the caption's palette
  colour (majority over frames); by direction, not RGB distance, so blur and dimming keep the hue;
- shape: fill of its bounding box (square ~1, circle ~0.79, triangle ~0.5; majority over frames);
- direction: the displacement of its centre from the first to the last frame points the caption's way;
- linearity: R^2 of a straight-line fit of the centre over time along the caption's axis;
- identity: fraction of frames in which the object keeps the colour and shape it has in most frames;
- stability: coefficient of variation of its area over time, and the spread of its colour (0-255);
- flicker: mean absolute change between consecutive frames away from the object (0-255).

With the training manifest (written by `python -m data.synthetic`), the averages are also split into
caption combinations seen in training and held out of it. The synthetic generator's own videos score
close to perfect (the ceiling); noise and a static object score badly.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import numpy as np
from scipy import ndimage

from data import tensor_to_frames
from data.synthetic import COLORS, DIRECTIONS, parse_caption
from errors import InputError

MIN_AREA, MAX_AREA = 0.005, 0.25  # plausible object area, as a fraction of the frame
FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that counts as foreground (0-255 units)
FILL_SQUARE, FILL_CIRCLE = 0.89, 0.64  # bounding-box fill above: square; above: circle; below: triangle


@dataclass
class Score:
    name: str
    caption: str
    presence: float
    color: float
    shape: float
    direction: float
    linearity: float
    identity: float
    area_cv: float
    color_spread: float
    flicker: float
    seen: str  # "seen", "held_out" or "unknown"
    found: int = 0  # frames in which an object of plausible size was found (colour and shape need 1, direction 2)
    start: tuple[float, float] | None = None  # the object's centre (x, y) in the first frame it was found in

    METRICS = ("presence", "color", "shape", "direction", "linearity", "identity", "area_cv", "color_spread", "flicker")


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """Connected components (4-neighbour) of a boolean (H, W) mask, as arrays of (row, col), largest first
    (equal sizes in raster order of their first pixel)."""
    labels, count = ndimage.label(mask)
    pixels = [np.argwhere(labels == i) for i in range(1, count + 1)]
    return sorted(pixels, key=len, reverse=True)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one pixel (8-neighbour): the anti-aliased edge belongs to the object. Nothing
    outside the frame, so an object at one edge does not reach the opposite one."""
    return ndimage.binary_dilation(mask, structure=np.ones((3, 3), dtype=bool))


def _shape_of(pixels: np.ndarray) -> str:
    rows, cols = pixels[:, 0], pixels[:, 1]
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = len(pixels) / box
    return "square" if fill >= FILL_SQUARE else "circle" if fill >= FILL_CIRCLE else "triangle"


def _nearest_color(rgb: np.ndarray, background: np.ndarray) -> str:
    """The palette colour whose direction from the background is closest (cosine) to the object's.

    Anti-aliased edges, blur and dimming mix the object's colour with the background's, which moves it along
    the line between the two but not off it; so the direction of (colour - background) keeps the hue where
    the nearest colour in plain RGB distance does not (a dimmed yellow is nearer to green, a grey-white to
    yellow)."""
    v = rgb - background
    v = v / max(float(np.linalg.norm(v)), 1e-9)

    def cosine(name: str) -> float:
        p = np.array(COLORS[name], dtype=float) - background
        return float(v @ p / max(float(np.linalg.norm(p)), 1e-9))

    return max(COLORS, key=cosine)


def _majority(values: list[str]) -> str | None:
    return max(set(values), key=values.count) if values else None


@dataclass
class Detection:
    """The object found in one frame (None fields when there is none of plausible size)."""

    present: bool  # exactly one foreground component, and it is of an object's size
    mask: np.ndarray  # (H, W) bool, the object grown by one pixel
    centre: np.ndarray | None = None  # (x, y) in the synthetic set's continuous frame
    area: int = 0
    colour: np.ndarray | None = None  # mean RGB
    shape: str | None = None
    colour_name: str | None = None  # the palette colour it is nearest to, seen against the background


def detect(frame: np.ndarray) -> Detection:
    """Find the object in one frame (H, W, 3), from the pixels alone."""
    f = frame.astype(np.float64)
    h, w = f.shape[:2]
    background = np.median(f.reshape(-1, 3), axis=0)
    mask = np.linalg.norm(f - background, axis=-1) > FOREGROUND_DISTANCE
    big = [c for c in _components(mask) if len(c) >= MIN_AREA * h * w]
    comps = [c for c in big if len(c) <= MAX_AREA * h * w]  # of an object's size
    obj_mask = np.zeros((h, w), dtype=bool)
    if not comps:
        return Detection(False, _dilate(obj_mask))
    obj = comps[0]
    obj_mask[obj[:, 0], obj[:, 1]] = True
    colour = f[obj[:, 0], obj[:, 1]].mean(0)
    return Detection(len(big) == 1 and len(comps) == 1, _dilate(obj_mask), obj.mean(0)[::-1] + 0.5, len(obj),
                     colour, _shape_of(obj), _nearest_color(colour, background))


def object_centres(frames: np.ndarray) -> list[tuple[float, float] | None]:
    """The object's centre (x, y) in every frame of uint8 (T, H, W, 3), None where none is found."""
    return [None if d.centre is None else (float(d.centre[0]), float(d.centre[1])) for d in map(detect, frames)]


def score_frames(frames: np.ndarray, caption: str, name: str = "", seen: str = "unknown") -> Score:
    """Score uint8 frames (T, H, W, 3) against a caption of the synthetic grammar."""
    parsed = parse_caption(caption)
    if parsed is None:
        raise InputError(f"{name or 'video'}: the caption {caption!r} is not 'a {{color}} {{shape}} moving {{direction}}'")
    color, shape, direction = parsed
    t = frames.shape[0]
    f = frames.astype(np.float64)
    detections = [detect(frame) for frame in frames]
    present = [d.present for d in detections]
    masks = [d.mask for d in detections]
    centres = [d.centre for d in detections]
    found_d = [d for d in detections if d.centre is not None]
    areas, colours, shapes = [d.area for d in found_d], [d.colour for d in found_d], [d.shape for d in found_d]
    names = [d.colour_name for d in found_d]
    found = [i for i, c in enumerate(centres) if c is not None]
    color_ok = shape_ok = direction_ok = 0.0
    linearity = identity = 0.0
    area_cv = color_spread = float("nan")
    if found:
        color_ok = float(_majority(names) == color)
        shape_ok = float(_majority(shapes) == shape)
        kinds = list(zip(names, shapes))
        identity = kinds.count(_majority(kinds)) / len(kinds)
        areas_a, colours_a = np.array(areas, dtype=float), np.array(colours)
        area_cv = float(areas_a.std() / areas_a.mean())
        color_spread = float(np.linalg.norm(colours_a - colours_a.mean(0), axis=1).mean())
    if len(found) >= 2:
        pts = np.array([centres[i] for i in found])
        move = pts[-1] - pts[0]
        dx, dy = DIRECTIONS[direction]
        axis = 0 if dx else 1
        along = move[axis] * (dx or dy)
        direction_ok = float(along > 0 and abs(move[axis]) > abs(move[1 - axis]))
        x, y = np.array(found, dtype=float), pts[:, axis]
        if y.std() > 1e-9:
            slope, intercept = np.polyfit(x, y, 1)
            residual = y - (slope * x + intercept)
            linearity = float(max(0.0, 1 - residual.var() / y.var()))
    # flicker outside the object: change between consecutive frames where neither frame has the object
    flicker = float("nan")
    if t > 1:
        outside = ~(np.stack(masks[:-1]) | np.stack(masks[1:]))  # (T - 1, H, W)
        if outside.any():
            flicker = float(np.abs(np.diff(f, axis=0)).mean(-1)[outside].mean())
    return Score(name, caption, float(np.mean(present)), color_ok, shape_ok, direction_ok, linearity, identity,
                 area_cv, color_spread, flicker, seen, len(found),
                 (float(centres[found[0]][0]), float(centres[found[0]][1])) if found else None)


def preview_scores(prompts: list[str], videos) -> dict:
    """The averages of presence, colour, shape, direction and linearity over videos (B, 3, T, H, W) in [-1, 1]
    whose prompts follow the synthetic grammar (others are left out), as `motion/NAME` metrics."""
    scores = [score_frames(tensor_to_frames(v), p) for p, v in zip(prompts, videos) if parse_caption(p)]
    if not scores:
        return {}
    return {f"motion/{m}": sum(getattr(x, m) for x in scores) / len(scores)
            for m in ("presence", "color", "shape", "direction", "linearity")} | {"motion/videos": len(scores)}


def read_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def score_dir(directory: str | Path, manifest: str | Path | None = None) -> tuple[list[Score], dict]:
    """Scores of every NAME.mp4 with a NAME.txt in `directory`, and their averages (all, seen, held out)."""
    directory = Path(directory)
    held, train = caption_groups(manifest)
    scores = []
    for video in sorted(directory.glob("*.mp4")):
        caption_file = video.with_suffix(".txt")
        if not caption_file.is_file():
            continue
        caption = caption_file.read_text().strip()
        scores.append(score_frames(read_frames(video), caption, video.stem, group_of(caption, held, train)))
    if not scores:
        raise InputError(f"no NAME.mp4 with a NAME.txt caption in {directory}")
    return scores, summarise(scores)


def caption_groups(manifest: str | Path | None) -> tuple[set[str], set[str]]:
    """(held-out captions, training captions) from the synthetic set's manifest.json; empty without one."""
    if manifest is None:
        return set(), set()
    m = json.loads(Path(manifest).read_text())
    return set(m.get("holdout_captions", [])), set(m.get("train_captions", []))


def group_of(caption: str, held: set[str], train: set[str]) -> str:
    return "held_out" if caption in held else "seen" if caption in train else "unknown"


def summarise(scores: list[Score]) -> dict:
    """The averages of every metric over all videos, the seen and the held-out ones (NaNs left out)."""
    groups = {"all": scores, "seen": [s for s in scores if s.seen == "seen"],
              "held_out": [s for s in scores if s.seen == "held_out"]}
    summary = {}
    for group, members in groups.items():
        if members:
            summary[group] = {"videos": len(members)} | {
                m: float(np.nanmean([getattr(s, m) for s in members])) if not all(
                    np.isnan(getattr(s, m)) for s in members) else float("nan") for m in Score.METRICS}
    return summary


def table(summary: dict, first: str = "group") -> str:
    header = [first, "videos", "presence", "colour", "shape", "direction", "linearity R2", "identity", "area CV",
              "colour spread", "flicker"]
    rows = [[g, str(v["videos"])] + [f"{v[m]:.3f}" if m not in ("color_spread", "flicker") else f"{v[m]:.1f}"
                                     for m in Score.METRICS] for g, v in summary.items()]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluation.motion_score", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", type=Path, help="folder of NAME.mp4 videos with NAME.txt captions (sample.py writes these)")
    p.add_argument("--manifest", type=Path, help="the training shards' manifest.json, to split seen / held-out captions")
    p.add_argument("--json", type=Path, help="write per-video scores and the averages here")
    p.add_argument("--per-video", action="store_true", help="also print one row per video")
    args = p.parse_args(argv)
    try:
        scores, summary = score_dir(args.dir, args.manifest)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.per_video:
        print(table({s.name: {"videos": 1} | {m: getattr(s, m) for m in Score.METRICS} for s in scores}, "video"))
        print()
    print(table(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary": summary, "videos": [asdict(s) for s in scores]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
