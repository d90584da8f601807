"""Does the same array of frames give the same mp4 bytes? libx264 as PyAV opens it (slice threads, every
instruction set) against the options `data.video_write.encode_mp4` adds (frame threads, every set but AVX-512),
each of the two alone, and no assembly at all.

Each mode encodes the same frames `--tries` times in this one process and counts the distinct byte strings;
the time is the median per encode. Frames: 17 noisy 64x64 frames (the content that shows the difference most)
and 17 frames of a real clip at 256x256.

    python -m bench.mp4_determinism                 # 200 tries each, writes bench/results/mp4_determinism.json
    python -m bench.mp4_determinism --tries 40 --out /tmp/m.json
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import statistics
import sys
import time
from fractions import Fraction
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import av
import numpy as np

from bench.common import ROOT, markdown_table
from data.video_write import _x264_params, x264_cpu_capabilities

CLIP = ROOT / "tests" / "assets" / "clips"


def noisy_frames(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (17, 8, 8, 3)).astype(np.float32)
    frames = np.repeat(np.repeat(blocks, 8, 1), 8, 2)
    return (frames + rng.normal(0, 20, frames.shape)).clip(0, 255).astype(np.uint8)


def clip_frames() -> np.ndarray:
    from data.video_io import read_video, tensor_to_frames

    clip = sorted(CLIP.glob("*.mp4"))[0]
    return tensor_to_frames(read_video(clip, 17, size=(256, 256)))


def encode(frames: np.ndarray, options: dict) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(8))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "18", **options}
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def measure(frames: np.ndarray, options: dict, tries: int) -> dict:
    hashes, times = collections.Counter(), []
    for _ in range(tries):
        t0 = time.perf_counter()
        data = encode(frames, options)
        times.append(time.perf_counter() - t0)
        hashes[hashlib.md5(data).hexdigest()] += 1
    return {"tries": tries, "distinct": len(hashes), "most_common_share": hashes.most_common(1)[0][1] / tries,
            "ms_per_encode": 1000 * statistics.median(times)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tries", type=int, default=200, help="encodes of the same frames per row")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "mp4_determinism.json", help="the JSON written")
    args = p.parse_args(argv)
    modes = {"x264 as PyAV opens it": {}, "frame threads only": _x264_params(avx512=True),
             "no AVX-512 only": _x264_params(sliced=True), "ours (both)": _x264_params(),
             "no assembly": {"x264-params": "asm=0"}, "no assembly, frame threads": {"x264-params": "asm=0:sliced-threads=0"}}
    contents = {"noise 64x64": noisy_frames(), "clip 256x256": clip_frames()}
    rows, results = [], []
    for content, frames in contents.items():
        for mode, options in modes.items():
            r = measure(frames, options, args.tries) | {"content": content, "mode": mode, "options": options}
            results.append(r)
            rows.append([content, mode, r["tries"], r["distinct"], f"{r['most_common_share']:.3f}", f"{r['ms_per_encode']:.1f}"])
    print(f"libx264 finds: {' '.join(x264_cpu_capabilities()) or '(nothing logged)'}")
    print(markdown_table(["frames", "mode", "tries", "distinct files", "most common share", "ms / encode"], rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu_capabilities": list(x264_cpu_capabilities()), "av": av.__version__,
                                    "libavcodec": ".".join(map(str, av.library_versions["libavcodec"])),
                                    "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
