"""Scores of one clip, from its frames: motion, sharpness, exposure and a perceptual hash for near-duplicates.

Every score is measured on frames brought to one width (`ANALYSIS_WIDTH`, the height keeping the aspect), so a
score means the same for a 4K source and a phone clip:
- `motion`: the median over evenly spaced frame pairs of the mean optical-flow magnitude (OpenCV's Farneback),
  in percent of the frame's width per frame. A locked-off shot of a talking head is about 0.3, a walk 1-3, a
  pan 3 and more; a frozen frame 0.
- `static_fraction`: the share of those pairs whose frames are the same to within 1 grey level on average: 1 for
  a frozen clip, about 1 - 1/k for a slideshow that holds each picture for k pairs.
- `sharpness`: the variance of the Laplacian of the grey frame (the classic focus measure), median over frames.
- `brightness` (mean luma, 0-1) and `clipped` (the share of pixels at 0-4 or 251-255: crushed or blown).
- `dhash`: a 64-bit difference hash of the middle frame (16 hex digits); two clips within a few bits are the same
  picture, re-encoded, resized or nearly so.
- `text_area`: the share of the frame inside text that RapidOCR finds and reads (its detector and recogniser ship
  in the wheel: nothing to download), the mean over three frames at `OCR_WIDTH` wide: burned-in subtitles,
  captions, title cards and watermarks. A box counts only where at least two characters are read in it with
  confidence `OCR_MIN_CONFIDENCE`: the detector alone also boxes textured surfaces (a crowd of bicycles), which
  the recogniser reads as nothing legible or as one stray glyph, as it does a rider's number. A line of subtitles
  covers about 0.03 of a 16:9 frame; a clean clip 0.
"""

from __future__ import annotations

import numpy as np

ANALYSIS_WIDTH = 256
MOTION_PAIRS = 12  # frame pairs the flow is measured on, evenly spaced through the clip
SHARPNESS_FRAMES = 5
OCR_FRAMES = 3
OCR_WIDTH = 640  # text a viewer can read at 640 wide is what the detector must find
OCR_MIN_CONFIDENCE = 0.8
# what a finished source's rows hold: a rerun after a score was added redoes its sources
SCORE_NAMES = ("motion", "static_fraction", "sharpness", "brightness", "clipped", "dhash", "text_area")
_ocr_engine = None


def _cv2():
    try:
        import cv2
    except ImportError:
        from errors import InputError
        raise InputError("the curation scores need OpenCV: pip install -e '.[curate]'") from None
    return cv2


def _ocr():
    """RapidOCR's text detector, made once per process."""
    global _ocr_engine
    if _ocr_engine is None:
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError:
            from errors import InputError
            raise InputError("the text-overlay score needs RapidOCR: pip install -e '.[curate]'") from None
        _ocr_engine = RapidOCR()
    return _ocr_engine


def analysis_gray(frame_rgb: np.ndarray) -> np.ndarray:
    """One RGB uint8 frame (H, W, 3) as grey at ANALYSIS_WIDTH wide."""
    cv2 = _cv2()
    h, w = frame_rgb.shape[:2]
    height = max(8, round(h * ANALYSIS_WIDTH / w))
    gray = cv2.cvtColor(np.ascontiguousarray(frame_rgb), cv2.COLOR_RGB2GRAY)
    return cv2.resize(gray, (ANALYSIS_WIDTH, height), interpolation=cv2.INTER_AREA)


def sample_positions(frames: int, count: int) -> list[int]:
    """`count` evenly spaced frame positions in a clip of `frames` (all of them when it is shorter)."""
    if frames <= count:
        return list(range(frames))
    return sorted({round(i * (frames - 1) / (count - 1)) for i in range(count)})


def _pair_starts(frames: int) -> list[int]:
    """The first frames of the pairs the motion scores are measured on."""
    return sample_positions(frames - 1, MOTION_PAIRS) if frames > 1 else []


def frames_needed(frames: int) -> set[int]:
    """The positions in a clip of `frames` whose grey frames `score_clip` reads: the pairs and the sharpness set."""
    pairs = _pair_starts(frames)
    return set(pairs) | {p + 1 for p in pairs} | set(sample_positions(frames, SHARPNESS_FRAMES)) | {frames // 2}


def text_positions(frames: int) -> list[int]:
    """The positions in a clip of `frames` whose frames the text-overlay score reads."""
    return sample_positions(frames, OCR_FRAMES)


def dhash(gray: np.ndarray) -> str:
    """64-bit difference hash: the frame at 9x8, each bit whether a pixel is brighter than its right neighbour."""
    cv2 = _cv2()
    small = cv2.resize(gray, (9, 8), interpolation=cv2.INTER_AREA).astype(np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def ocr_frame(frame_rgb: np.ndarray) -> np.ndarray:
    """One RGB uint8 frame brought down to OCR_WIDTH wide (a smaller one is left as it is), as BGR for the
    detector."""
    cv2 = _cv2()
    h, w = frame_rgb.shape[:2]
    if w > OCR_WIDTH:
        frame_rgb = cv2.resize(frame_rgb, (OCR_WIDTH, max(8, round(h * OCR_WIDTH / w))), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(np.ascontiguousarray(frame_rgb), cv2.COLOR_RGB2BGR)


def text_area(frames_bgr: list[np.ndarray]) -> float:
    """The mean share of each frame covered by the text read in it (the union of its boxes, so overlapping
    boxes count once)."""
    cv2 = _cv2()
    shares = []
    for frame in frames_bgr:
        found, _ = _ocr()(frame, use_det=True, use_cls=False, use_rec=True)  # [(box, text, confidence)] or None
        mask = np.zeros(frame.shape[:2], np.uint8)
        for box, text, confidence in found or []:
            if float(confidence) >= OCR_MIN_CONFIDENCE and len("".join(text.split())) >= 2:
                cv2.fillPoly(mask, [np.asarray(box, np.float32).round().astype(np.int32)], 1)
        shares.append(float(mask.mean()))
    return round(float(np.mean(shares)), 4) if shares else 0.0


def hamming(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def score_clip(gray: dict[int, np.ndarray], frames: int) -> dict:
    """The scores of a clip of `frames` frames from its grey frames at the positions `frames_needed` names (all
    but `text_area`, which `text_area()` measures on its own frames)."""
    cv2 = _cv2()
    motions, static = [], []
    for p in _pair_starts(frames):
        a, b = gray[p], gray[p + 1]
        flow = cv2.calcOpticalFlowFarneback(a, b, None, pyr_scale=0.5, levels=3, winsize=15, iterations=3,
                                            poly_n=5, poly_sigma=1.2, flags=0)
        motions.append(float(np.sqrt((flow ** 2).sum(-1)).mean()) * 100.0 / a.shape[1])
        static.append(float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()) < 1.0)
    sharp_at = sample_positions(frames, SHARPNESS_FRAMES)
    sharpness = [float(cv2.Laplacian(gray[p], cv2.CV_64F).var()) for p in sharp_at]
    stack = np.stack([gray[p] for p in sharp_at])
    return {
        "motion": round(float(np.median(motions)), 4) if motions else 0.0,
        "static_fraction": round(float(np.mean(static)), 4) if static else 1.0,
        "sharpness": round(float(np.median(sharpness)), 2),
        "brightness": round(float(stack.mean()) / 255.0, 4),
        "clipped": round(float(((stack <= 4) | (stack >= 251)).mean()), 4),
        "dhash": dhash(gray[frames // 2]),
    }
