"""The filters: each a threshold on one score, each giving a reason a clip is dropped. The defaults, and why:

- motion below 0.1 (% of the width per frame): a frozen or all-but-frozen picture teaches the model nothing of
  motion, and such clips are the bulk of what a text-to-video model learns to stand still from. A locked-off
  shot of someone talking measures about 0.3, so it stays.
- static_fraction above 0.5: a slideshow or a clip that freezes for half its length.
- sharpness below 15 (Laplacian variance at 256 wide): out of focus or heavily blurred; a soft but focused shot
  measures 50 and more.
- brightness below 0.06 or above 0.94, clipped above 0.6: black frames, fades and blown-out frames.
- text_area above 0.02: burned-in subtitles, captions or a title card (a line of subtitles covers about 0.03 of
  the frame); a model trained on them writes garbled text into its videos. A corner logo or a small watermark
  stays below it.
- aesthetic below 4.5 (only with `--aesthetic-head`): LAION's predictor on its 1-10 scale; 4.5 is where the
  LAION-Aesthetics subsets start, the bar the field's open video sets use for "looks like footage worth learning".
- clip_score below 20 (only with `--clip`, and for a clip with a caption): the caption describes something else.
  A starting point, not a measurement (no real CLIP weights can be fetched here): look at the histogram and at
  the captions of the clips below the line in the manifest before trusting it.
- a near-duplicate (a middle-frame hash within 4 of 64 bits of an earlier kept clip's): the same shot twice,
  which weighs it double and leaks between splits.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .scores import hamming


REASONS = ("motion", "static", "blur", "exposure", "text", "aesthetic", "caption", "duplicate")  # why a clip is dropped, in filter order


@dataclass(frozen=True)
class Thresholds:
    motion_min: float = 0.1
    static_max: float = 0.5
    sharpness_min: float = 15.0
    brightness_min: float = 0.06
    brightness_max: float = 0.94
    clipped_max: float = 0.6
    text_max: float = 0.02
    aesthetic_min: float = 4.5
    clip_min: float = 20.0
    dup_bits: int = 4  # -1 turns the near-duplicate filter off

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def drop_reasons(row: dict, t: Thresholds) -> list[str]:
    """Why the score filters drop this clip (empty: it passes them)."""
    reasons = []
    if row["motion"] < t.motion_min:
        reasons.append("motion")
    if row["static_fraction"] > t.static_max:
        reasons.append("static")
    if row["sharpness"] < t.sharpness_min:
        reasons.append("blur")
    if not t.brightness_min <= row["brightness"] <= t.brightness_max or row["clipped"] > t.clipped_max:
        reasons.append("exposure")
    if row["text_area"] > t.text_max:
        reasons.append("text")
    if row.get("aesthetic") is not None and row["aesthetic"] < t.aesthetic_min:
        reasons.append("aesthetic")
    if row.get("clip_score") is not None and row["clip_score"] < t.clip_min:
        reasons.append("caption")
    return reasons


def apply(rows: list[dict], t: Thresholds) -> list[dict]:
    """Each row with `drop` (the reasons, in filter order), `duplicate_of` (the earlier kept clip it repeats, or
    None) and `keep`. Rows are taken in their order (sources sorted, clips in time), so the first of a set of
    duplicates is the one kept, on every run."""
    kept_hashes: list[tuple[str, str]] = []
    out = []
    for row in rows:
        reasons = drop_reasons(row, t)
        dup = None
        if t.dup_bits >= 0 and not reasons:
            dup = next((clip for clip, h in kept_hashes if hamming(h, row["dhash"]) <= t.dup_bits), None)
            if dup is not None:
                reasons.append("duplicate")
        if not reasons:
            kept_hashes.append((row["clip"], row["dhash"]))
        out.append(row | {"drop": reasons, "duplicate_of": dup, "keep": not reasons})
    return out
