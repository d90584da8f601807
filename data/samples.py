"""One raw shard sample to a training example: what it is (without decoding it), its window decoded and
cropped (or its latents loaded), the buckets it may go to, why it is skipped, and batches of examples.

    info, meta = sample_info(sample)                    # from KEY.json, else a probe of the file; SkipSample
    example = decode_sample(sample, spec, rng)          # {"video": (3, T, H, W), "caption", "key", "fps", "meta"}
    batch = collate([example, ...])                     # {"video": (B, 3, T, H, W), ...}
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from errors import InputError

from .buckets import Bucket, bucket_order, latent_bucket
from .shards import LATENT_EXT
from .tar_reader import media_member
from .video_io import ClipTooShortError, VideoInfo, VideoReadError, probe, read_clip


class SkipSample(Exception):
    """Raised while decoding a sample that must be skipped; `reason` is the counter's key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class SkipRecord:
    reason: str  # corrupt | too_short | no_caption | bad_caption | no_video | bad_latents | bad_shard | truncated_shard
    key: str
    url: str
    detail: str


@dataclass(frozen=True)
class ClipSpec:
    """What each sample becomes: a window of `frames` frames at `fps`, cropped to `size`."""

    frames: int | None  # 1 + 4k; None for latent shards (take what is stored)
    size: tuple[int, int] | None
    fps: float | None
    window: str  # start | center | random
    crop: str  # center | random
    decode_threads: int = 0  # per decoder; 0: FFmpeg's default (one per core)
    zoom: tuple[float, float] = (1.0, 1.0)  # random crops: the covering scale times a factor from this range
    hflip: bool = False  # mirror half the clips left to right

    def at(self, bucket: Bucket) -> "ClipSpec":
        """This spec at a bucket's frames and size."""
        return dataclasses.replace(self, frames=bucket.frames, size=(bucket.height, bucket.width))


def sample_meta(sample: dict) -> dict:
    """The sample's KEY.json ({} without one); SkipSample when it does not parse."""
    if "json" not in sample:
        return {}
    try:
        meta = json.loads(sample["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SkipSample("corrupt", f"KEY.json does not parse: {e}") from e
    if not isinstance(meta, dict):
        raise SkipSample("corrupt", f"KEY.json holds a {type(meta).__name__}, not an object of fields")
    return meta


def require_media(sample: dict) -> str:
    """The extension of the sample's video or image member; SkipSample when it has none."""
    ext = media_member(sample)
    if ext is None:
        found = ", ".join(k for k in sample if not k.startswith("__"))
        raise SkipSample("no_video", f"no video or image member (found: {found})")
    return ext


def sample_info(sample: dict) -> tuple[VideoInfo | None, dict]:
    """(what the sample's video is, its KEY.json) without decoding frames: from KEY.json where it records the
    video, else from a probe of the file; (None, meta) for a latent sample. Raises SkipSample."""
    meta = sample_meta(sample)
    if LATENT_EXT in sample:
        return None, meta
    ext = require_media(sample)
    info = VideoInfo.from_meta(meta)
    if info is None:
        try:
            info = probe(sample[ext])
        except VideoReadError as e:
            raise SkipSample("corrupt", str(e)) from e
    return info, meta


def decode_sample(sample: dict, spec: ClipSpec, rng: np.random.Generator) -> dict:
    """The sample decoded with `rng` drawing its window, crop and flip; SkipSample when it cannot be used."""
    key = sample.get("__key__", "?")
    caption = sample.get("txt")
    try:
        caption = caption.decode("utf-8").strip() if isinstance(caption, bytes) else None
    except UnicodeDecodeError as e:
        raise SkipSample("bad_caption", f"KEY.txt is not UTF-8 text (offset {e.start}); a caption is read as "
                                        f"UTF-8, never guessed") from e
    if not caption:
        raise SkipSample("no_caption", "the sample has no KEY.txt caption, or it is empty")
    meta = sample_meta(sample)
    if LATENT_EXT in sample:
        return decode_latents(sample[LATENT_EXT], caption, key, meta, spec)
    ext = require_media(sample)
    info = VideoInfo.from_meta(meta)
    try:
        clip = read_clip(sample[ext], spec.frames, fps=spec.fps, size=spec.size, start=spec.window,
                         crop=spec.crop, zoom=spec.zoom, rng=rng, info=info, threads=spec.decode_threads)
    except ClipTooShortError as e:
        raise SkipSample("too_short", str(e)) from e
    except VideoReadError as e:
        raise SkipSample("corrupt", str(e)) from e
    if spec.hflip and rng.random() < 0.5:  # drawn only with hflip: a seeded stream without it is unchanged
        clip.frames = np.ascontiguousarray(clip.frames[:, :, ::-1])
    out = {"video": clip.to_tensor(), "caption": caption, "key": key, "fps": clip.fps, "meta": meta}
    if clip.available is not None or (info is not None and info.declared_frames):
        claimed = (info.declared_frames or info.frames) if info is not None else None
        decoded = clip.available if clip.available is not None else info.frames
        out["__short__"] = f"claims {claimed or '?'} frames and {decoded} decode; windows are taken from those"
    return out


def decode_latents(data: bytes, caption: str, key: str, meta: dict, spec: ClipSpec) -> dict:
    try:
        z = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise SkipSample("bad_latents", f"KEY.latents.npy does not load: {e}") from e
    if z.ndim != 4:
        raise SkipSample("bad_latents", f"latents must be (C, t, h, w), got shape {z.shape}")
    if spec.frames is not None and meta.get("frames") not in (None, spec.frames):
        raise SkipSample("too_short", f"latents encode {meta['frames']} frames, {spec.frames} were asked for")
    if spec.size is not None and (meta.get("height"), meta.get("width")) not in ((None, None), spec.size):
        raise SkipSample("bad_latents", f"latents encode {meta.get('height')}x{meta.get('width')}, {spec.size} was asked for")
    return {"latents": torch.from_numpy(z.astype(np.float32)), "caption": caption, "key": key,
            "fps": float(meta.get("fps", 0.0)), "meta": meta}


def collate(samples: list[dict]) -> dict:
    tensor_key = "latents" if "latents" in samples[0] else "video"
    shapes = {tuple(s[tensor_key].shape) for s in samples}
    if len(shapes) > 1:
        raise InputError(f"samples in one batch have different shapes {sorted(shapes)}: give a size (frames are then "
                         f"resized and cropped to it), or write latent shards at one size")
    return {
        tensor_key: torch.stack([s[tensor_key] for s in samples]),  # (B, C, T, H, W)
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        "fps": torch.tensor([s["fps"] for s in samples], dtype=torch.float32),
        "meta": [s["meta"] for s in samples],
    }


def collate_packed(samples: list[dict]) -> dict:
    """A packed batch: `video` (or `latents`) is a list of (C, T_i, H_i, W_i) tensors of mixed shapes."""
    tensor_key = "latents" if "latents" in samples[0] else "video"
    return {tensor_key: [s[tensor_key] for s in samples], "packed": True, "caption": [s["caption"] for s in samples],
            "key": [s["key"] for s in samples], "fps": torch.tensor([s["fps"] for s in samples], dtype=torch.float32),
            "meta": [s["meta"] for s in samples]}


def buckets_for(sample: dict, buckets: Sequence[Bucket], fps: float | None) -> list[int]:
    """The buckets a raw sample may go to, best first (data/buckets.py); latents: the one they were encoded at.
    Raises SkipSample for a sample that cannot be measured."""
    info, meta = sample_info(sample)
    if info is None:
        i = latent_bucket(buckets, meta)
        return [] if i is None else [i]
    return bucket_order(buckets, info, fps)


def no_bucket(sample: dict, buckets: Sequence[Bucket], key: str = "", url: str = "") -> SkipRecord:
    """Why a sample fits none of the buckets: too_short (a video shorter than every bucket) or no_bucket."""
    info, meta = sample_info(sample)
    if info is None:
        return SkipRecord("no_bucket", key, url, f"latents of {meta.get('frames')}x{meta.get('height')}x"
                                                 f"{meta.get('width')} match no bucket")
    if info.fps <= 0 or info.frames <= 1:
        return SkipRecord("no_bucket", key, url, "an image, and no bucket has one frame")
    shortest = min((b.frames for b in buckets if b.frames > 1), default=None)
    return SkipRecord("too_short", key, url, f"{info.frames} frames at {info.fps:g} fps fill no bucket "
                                             f"(the shortest takes {shortest} frames)")
