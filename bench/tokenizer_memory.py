"""Peak memory of `tokenizer.evaluate` on one 256x256 window of a long clip, against the window's length.

Our tokenizer reads, encodes, decodes and scores a window a chunk at a time from the file (`--chunk`), so its
memory should not grow with the window's frames; the window held whole (as every window once was) is measured
beside it where it fits. Each measurement is a fresh process running the command (a randomly initialised
tokenizer of `--preset`, `--chunk 2`, the side-by-side video written), whose peak resident memory (VmHWM) is
read when it ends. The clip: the 250 frames of tests/assets/clips/bikes.mp4 played forward and back, 1,201
frames at 640x272. Prints a table and writes JSON.

    python -m bench.tokenizer_memory                      # 81, 321 and 1,201 frames; whole for 81 and 321
    python -m bench.tokenizer_memory --frames 81 321 --whole 81 --out /tmp/m.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, markdown_table

CLIP = ROOT / "tests" / "assets" / "clips" / "bikes.mp4"
LONG = 1201


def long_clip(path: Path) -> Path:
    """bikes.mp4 forward and back until LONG frames, at its own size and rate."""
    import av
    import numpy as np

    from data.video_write import video_writer

    with av.open(str(CLIP)) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
        fps = float(c.streams.video[0].average_rate)
    loop = np.concatenate([frames, frames[::-1]])
    with video_writer(path, frames.shape[2], frames.shape[1], fps=fps) as write:
        for a in range(0, LONG, 100):
            write(loop[np.arange(a, min(a + 100, LONG)) % len(loop)])
    return path


def worker(spec: dict) -> None:
    """One evaluate run in this process; prints its peak resident memory."""
    import torch

    import tokenizer.evaluate as ev
    from tokenizer import CausalVAE, save_vae

    torch.manual_seed(0)
    folder = Path(spec["scratch"]) / f"vae_{spec['preset']}"
    if not folder.is_dir():
        save_vae(CausalVAE.from_preset(spec["preset"]), folder)
    if spec["mode"] == "whole":
        ev.streams = lambda *a: False
    out = Path(spec["scratch"]) / f"eval_{spec['mode']}_{spec['frames']}"
    status = ev.main(["--ckpt", str(folder), "--data", spec["clip"], "--frames", str(spec["frames"]), "--size", "256",
                      "--windows", "1", "--chunk", str(spec["chunk"]), "--out", str(out)])
    peak = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM:"))
    report = json.loads((out / "report.json").read_text())
    (result,) = report["tokenizers"].values()
    print(json.dumps({"status": status, "peak_rss_mb": peak / 1024, "psnr": result["mean"]["psnr"],
                      "frames_scored": result["videos"][0]["frames"]}))


def measure(spec: dict) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed memory leaves the resident set (bench.common)
    out = subprocess.run([sys.executable, "-m", "bench.tokenizer_memory", "--worker", json.dumps(spec)], cwd=ROOT,
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return {"failed": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, nargs="+", default=[81, 321, LONG], help="window lengths read a chunk at a time")
    p.add_argument("--whole", type=int, nargs="*", default=[81, 321], help="lengths also measured held whole")
    p.add_argument("--preset", default="small", help="the tokenizer preset, randomly initialised")
    p.add_argument("--chunk", type=int, default=2, help="latent frames per step (tokenizer.evaluate --chunk)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tokenizer_memory.json", help="the JSON written")
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    rows, results = [], []
    with tempfile.TemporaryDirectory() as scratch:
        clip = long_clip(Path(scratch) / "long.mp4")
        runs = [("stream", n) for n in args.frames] + [("whole", n) for n in args.whole]
        for mode, n in runs:
            spec = {"mode": mode, "frames": n, "preset": args.preset, "chunk": args.chunk, "clip": str(clip),
                    "scratch": scratch}
            r = measure(spec) | {"mode": mode, "frames": n}
            results.append(r)
            print(json.dumps(r), flush=True)
    first = {r["mode"]: r["peak_rss_mb"] for r in results if r["frames"] == min(args.frames) and "peak_rss_mb" in r}
    for r in results:
        peak = r.get("peak_rss_mb")
        ratio = f"{peak / first['stream']:.2f}" if peak and "stream" in first else "-"
        rows.append([r["mode"], r["frames"], f"{peak:.0f}" if peak else r.get("failed", "-"), ratio,
                     f"{r['psnr']:.2f}" if "psnr" in r else "-"])
    print(markdown_table(["window", "frames", "peak RSS (MiB)", f"/ stream at {min(args.frames)}", "PSNR"], rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"preset": args.preset, "chunk": args.chunk, "size": 256, "results": results},
                                   indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
