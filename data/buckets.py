"""Buckets of (frames, height, width) with a batch size each: footage keeps its aspect ratio and length.

    buckets = parse_buckets("256p", batch_size=4)       # a named family, or a file of lines
    buckets = parse_buckets("buckets.txt")              # "frames height width [batch]" per line, # comments
    check_divisible(buckets, multiple=16, frame_check)  # every shape must divide into the model's tokens
    order = bucket_order(buckets, info, fps)            # the buckets a sample may go to, best first

A sample goes to the bucket nearest its aspect ratio (so the least is cropped) among those whose duration
it can fill at the target fps; among buckets of that aspect ratio, the longest it can fill, then the largest
frame it need not upscale to. Images go to one-frame buckets; a video shorter than every bucket is skipped.

Every rank must train the same bucket at a step (DDP and FSDP2 run one collective per layer whatever the
shape, but sequence parallelism splits one sequence, and a rank on a smaller bucket would idle on the
others), so the bucket of batch n is drawn from (seed, n) alone, with weights from a scan of the data made
alike on every rank: `BucketSchedule`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from errors import InputError, MissingInputError

from .video_io import VideoInfo, last_window_start, window_stride


@dataclass(frozen=True)
class Bucket:
    frames: int
    height: int
    width: int
    batch_size: int

    @property
    def name(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.frames, self.height, self.width

    @property
    def aspect(self) -> float:
        return self.width / self.height

    def volume(self, temporal: int = 4) -> int:
        """Pixels the tokenizer sees, counting its latent frames (1 + (frames - 1) / temporal) as the unit."""
        return (1 + (self.frames - 1) // temporal) * self.height * self.width


# families: (frames, height, width); batch sizes come from --batch-size, scaled to keep tokens per batch even
_ASPECTS_256 = [(256, 256), (192, 336), (336, 192), (224, 288), (288, 224)]  # 1:1, 16:9, 9:16, 4:3, 3:4
_ASPECTS_480 = [(480, 480), (480, 832), (832, 480), (480, 640), (640, 480)]
_ASPECTS_64 = [(64, 64), (64, 96), (96, 64)]  # 1:1, 3:2, 2:3 (tests and the CPU demos)
PRESETS: dict[str, list[tuple[int, int, int]]] = {
    "64p": [(f, h, w) for f in (1, 9, 17) for h, w in _ASPECTS_64],
    "256p": [(f, h, w) for f in (1, 33, 65, 129) for h, w in _ASPECTS_256],
    "480p": [(f, h, w) for f in (1, 33, 81) for h, w in _ASPECTS_480],
}


def scaled_batch_sizes(shapes: Sequence[tuple[int, int, int]], batch_size: int) -> list[Bucket]:
    """Buckets whose batch sizes keep tokens per batch about even: the largest bucket takes `batch_size`
    clips, a bucket of a quarter of its volume four times as many."""
    vols = [Bucket(f, h, w, 1).volume() for f, h, w in shapes]
    top = max(vols)
    return [Bucket(f, h, w, max(1, int(batch_size * top / v + 1e-9))) for (f, h, w), v in zip(shapes, vols)]


def parse_buckets(spec: str, batch_size: int = 1) -> list[Bucket]:
    """Buckets from a preset name (PRESETS) or a file of `frames height width [batch]` lines."""
    if spec in PRESETS:
        return scaled_batch_sizes(PRESETS[spec], batch_size)
    path = Path(spec)
    if not path.is_file():
        raise MissingInputError(f"--buckets {spec}: neither a preset ({', '.join(PRESETS)}) nor a file")
    shapes, sizes = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        fields = text.replace(",", " ").split()
        names = ("frames", "height", "width", "batch")
        if len(fields) not in (3, 4):
            raise InputError(f"{path}:{number}: expected 'frames height width [batch]', got {line.strip()!r}")
        values = []
        for name, field in zip(names, fields):
            try:
                value = int(field)
            except ValueError:
                raise InputError(f"{path}:{number}: {name} must be a whole number, got {field!r}") from None
            if value < 1:
                raise InputError(f"{path}:{number}: {name} must be at least 1, got {value}")
            values.append(value)
        shapes.append(tuple(values[:3]))
        sizes.append(values[3] if len(values) == 4 else None)
    if not shapes:
        raise InputError(f"{path}: no buckets (lines of 'frames height width [batch]')")
    if len(set(shapes)) < len(shapes):
        dup = next(s for s in shapes if shapes.count(s) > 1)
        raise InputError(f"{path}: the bucket {dup[0]}x{dup[1]}x{dup[2]} is listed twice")
    scaled = scaled_batch_sizes(shapes, batch_size)
    return [b if n is None else Bucket(*b.shape, n) for b, n in zip(scaled, sizes)]


def check_divisible(buckets: Sequence[Bucket], multiple: tuple[int, int], frame_check: Callable[[int], None]) -> None:
    """An InputError naming the first bucket the model cannot take and the nearest one it can: height and
    width must be multiples of (mh, mw) (tokenizer downsampling times patch), frames pass `frame_check`."""
    mh, mw = multiple
    for b in buckets:
        try:
            frame_check(b.frames)
        except InputError as e:
            raise InputError(f"bucket {b.name}: {e}") from None
        if b.height % mh or b.width % mw:
            near = lambda v, m: max(m, math.floor(v / m + 0.5) * m)  # noqa: E731
            raise InputError(f"bucket {b.name}: height and width must be multiples of {mh} and {mw} (the tokenizer's "
                             f"downsampling times the patch); the nearest valid shape is "
                             f"{b.frames}x{near(b.height, mh)}x{near(b.width, mw)}")


def fills(info: VideoInfo, frames: int, fps: float | None) -> bool:
    """Whether a file of `info` holds a window of `frames` frames at `fps`."""
    if frames == 1:
        return info.frames >= 1
    if info.fps <= 0:  # an image
        return False
    try:
        last_window_start(info.frames, frames, window_stride(info.fps, fps))
    except ValueError:
        return False
    return True


def bucket_order(buckets: Sequence[Bucket], info: VideoInfo, fps: float | None) -> list[int]:
    """Indices of the buckets a sample may go to, best first (see the module's docstring); empty: none."""
    image = info.fps <= 0 or info.frames <= 1
    candidates = [i for i, b in enumerate(buckets) if (b.frames == 1) == image and fills(info, b.frames, fps)]
    ratio = info.width / max(1, info.height)

    def rank(i: int) -> tuple:
        b = buckets[i]
        upscale = b.height > info.height or b.width > info.width
        area = b.height * b.width
        return (round(abs(math.log(ratio / b.aspect)), 6), -b.frames, upscale, area if upscale else -area)
    return sorted(candidates, key=rank)


def latent_bucket(buckets: Sequence[Bucket], meta: dict) -> int | None:
    """The bucket a latent sample was encoded at (its KEY.json's frames, height and width), or None."""
    shape = (meta.get("frames"), meta.get("height"), meta.get("width"))
    return next((i for i, b in enumerate(buckets) if b.shape == shape), None)


class BucketSchedule:
    """The bucket of each batch index, weighted by the batches the data holds per bucket, the same on every rank.

    counts: samples per bucket (a scan of the data); bucket k's share of batches is p_k, its samples over its
    batch size, normalised. An independent draw per batch would let each bucket's share wander from p_k like
    a random walk, and the samples of the buckets drawn too rarely pile up in the readers' backlogs (and are
    dropped once those are full). So the batches follow stride scheduling: bucket k's j-th batch is due at
    (j + u_k) / p_k (u_k a seeded offset in [0, 1)), and batch n is the n-th due. Every prefix then holds each
    bucket's share to within a batch or two, and the buckets interleave. The walk is a state of a few integers
    (`start()`, `advance()`), carried in each reader's resume state; integer arithmetic throughout, so every rank
    computes the same sequence.

    (Simulated for one reader, with the backlogs of data/loader.py: four buckets holding 30, 20, 35 and 15% of
    the samples in batches of 15, 5, 2 and 2, backlogs of 32 samples: independent draws dropped 15% of the
    samples, this 0.6% (of 64: 9% and none); the quickstart's three equal buckets in batches of 48, 32 and 32,
    backlogs of 96: shuffled blocks of 16 batches dropped 8%, this none.)
    """

    SCALE = 1 << 20  # offsets u_k = r_k / SCALE

    def __init__(self, buckets: Sequence[Bucket], counts: Sequence[int], seed: int):
        if len(counts) != len(buckets):
            raise ValueError("one count per bucket")
        if sum(counts) <= 0:
            raise InputError("no sample of the data fits any bucket: give buckets whose shapes and durations the "
                             "footage can fill")
        self.buckets, self.counts, self.seed = list(buckets), [int(c) for c in counts], seed
        lcm = math.lcm(*(b.batch_size for b in self.buckets))
        self.shares = [c * (lcm // b.batch_size) for c, b in zip(self.counts, self.buckets)]  # p_k = shares_k / sum
        self.offsets = [int(v) for v in np.random.default_rng([seed, 0x0FF5E7]).integers(0, self.SCALE, len(self.buckets))]
        self._cache: tuple[int, list[int], list[int]] = (0, [0] * len(self.buckets), [])  # (n, taken, sequence)

    def start(self) -> dict:
        """The walk before batch 0: {"n": the next batch index, "taken": batches of each bucket so far}."""
        return {"n": 0, "taken": [0] * len(self.buckets)}

    def step(self, position: dict) -> int:
        """The bucket of batch position["n"]; advances the position (in place) past it."""
        taken, best = position["taken"], None
        for k, (a, r) in enumerate(zip(self.shares, self.offsets)):
            if not a:
                continue
            # due time (taken_k * SCALE + r_k) / (SCALE * p_k), compared across buckets by cross-multiplying
            if best is None or (taken[k] * self.SCALE + r) * self.shares[best] < (taken[best] * self.SCALE + self.offsets[best]) * a:
                best = k
        taken[best] += 1
        position["n"] += 1
        return best

    def advance(self, position: dict, n: int) -> int:
        """The bucket of batch n >= position["n"], walking the position past it."""
        if n < position["n"]:
            raise ValueError(f"batch {n} is behind the schedule's position {position['n']}")
        while True:
            k = self.step(position)
            if position["n"] > n:
                return k

    def __call__(self, n: int) -> int:
        """The bucket of batch n (0, 1, 2, ... on every rank), walked from the start (and remembered)."""
        done, taken, seq = self._cache
        position = {"n": done, "taken": list(taken)}
        while len(seq) <= n:
            seq.append(self.step(position))
        self._cache = (position["n"], position["taken"], seq)
        return seq[n]

    def to_json(self) -> dict:
        return {"buckets": [[b.frames, b.height, b.width, b.batch_size] for b in self.buckets], "counts": self.counts}


@dataclass(frozen=True)
class Packing:
    """Batches filled to a token budget with clips of mixed shapes (each at its best bucket's shape), for
    `DiT3D.forward_varlen`: `budget` tokens per batch, a clip of (frames, height, width) costing
    (1 + (frames - 1) // temporal) / pt x height / ph x width / pw tokens (cell = (pt, ph, pw) in latent
    frames and pixels). The readers choose each batch from a pool of `pool` samples."""

    budget: int
    temporal: int
    cell: tuple[int, int, int]
    pool: int = 32

    def tokens(self, shape: Sequence[int]) -> int:
        f, h, w = shape
        pt, ph, pw = self.cell
        return (1 + (f - 1) // self.temporal) // pt * (h // ph) * (w // pw)

    def check(self, buckets: Sequence[Bucket]) -> None:
        largest = max(buckets, key=lambda b: self.tokens(b.shape))
        if self.tokens(largest.shape) > self.budget:
            raise InputError(f"--pack {self.budget}: the bucket {largest.name} alone is {self.tokens(largest.shape)} "
                             f"tokens; give a budget of at least that, or drop the bucket")


def describe(buckets: Sequence[Bucket], counts: Sequence[int], scanned: int) -> str:
    lines = [f"buckets ({scanned} samples scanned):"]
    for b, c in zip(buckets, counts):
        lines.append(f"  {b.name:>14}  batch {b.batch_size:>3}  {c:>6} samples ({100 * c / max(1, scanned):.0f}%)")
    return "\n".join(lines)


def bucket_file_text(buckets: Sequence[Bucket]) -> str:
    return "".join(f"{b.frames} {b.height} {b.width} {b.batch_size}\n" for b in buckets)


def nearest_bucket(shapes: Sequence[Sequence[int]], frames: int, height: int, width: int) -> tuple[int, int, int]:
    """The (frames, height, width) of `shapes` nearest a requested shape: aspect ratio first, then size, then
    duration (sample.py's hint for a shape a run never trained on)."""
    def distance(s) -> tuple:
        f, h, w = s[:3]
        return (round(abs(math.log((width / height) / (w / h))), 6), abs(math.log(h * w / (height * width))),
                abs(f - frames))
    f, h, w = min(shapes, key=distance)[:3]
    return int(f), int(h), int(w)
