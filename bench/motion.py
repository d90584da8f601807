"""The motion benchmark: sample K videos per caption from trained runs and score them side by side.

    python bench/motion.py --ckpt runs/quickstart/dit [OTHER_RUN ...] [--manifest SHARDS/manifest.json]
                           [--captions holdout|all|train] [--videos-per-prompt 4] [--steps 30] [--guidance 5] [--shift S]
                           [--solver euler heun unipc dpm++] [--frames 17 33 49 65] [--extrapolate none riflex ntk]
                           [--out bench/results/motion.json]

Every combination of run x steps x cfg x solver x frames x extrapolation samples K videos (seeds 0..K-1) for
each caption in one pass (`--frames`: lengths past the trained one; `--extrapolate`: sample.py's option) and
scores them with `evaluation.motion_score`, split into caption combinations seen in training and held out of
it. Prints one table row per setting and writes JSON (settings, summaries and per-video scores), so that
two runs, or two sampler settings of one run, are compared on the same captions and seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import markdown_table  # noqa: E402
from dit3d.flow import SOLVERS  # noqa: E402
from dit3d.rope import METHODS as TIME_METHODS  # noqa: E402
from errors import InputError  # noqa: E402
from evaluation.generator import captions_for, sample_run  # noqa: E402
from evaluation.motion_score import score_dir  # noqa: E402


def run_setting(run: str, captions: list[str], k: int, steps: int | None, cfg: float | None, shift: float | None,
                solver: str, manifest_path: str | None, device: str, batch: int, frames: int | None = None,
                extrapolate: str = "none") -> dict:
    from pipeline import Pipeline

    pipe = Pipeline.load(run, device=device)
    d = pipe.defaults
    frames = frames or d["frames"]
    pipe.extrapolate_time(None if extrapolate == "none" else extrapolate, frames)
    steps = steps or d["sampler"]["steps"]
    cfg = d["sampler"]["guidance"] if cfg is None else cfg
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        jobs = sample_run(pipe, captions, k, Path(tmp), dict(steps=steps, guidance=cfg, shift=shift, solver=solver), batch,
                          frames=frames)
        seconds = time.perf_counter() - t0
        scores, summary = score_dir(tmp, manifest_path)
    return {"run": run, "steps": steps, "cfg": cfg, "shift": shift, "solver": solver, "frames": frames,
            "extrapolate": extrapolate, "trained_frames": d["frames"], "videos": len(jobs),
            "sampling_s": seconds, "summary": summary, "scores": [dataclasses.asdict(s) for s in scores]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", "--runs", dest="runs", nargs="+", required=True, help="train.py DiT run folders")
    p.add_argument("--manifest", help="the training shards' manifest.json (seen / held-out split)")
    p.add_argument("--captions", default="all", help="holdout, train, all (the synthetic set's) or a file of captions")
    p.add_argument("--videos-per-prompt", "--k", dest="k", type=int, default=4, help="videos per caption")
    p.add_argument("--steps", type=int, nargs="+", default=[None])
    p.add_argument("--guidance", "--cfg", dest="cfg", type=float, nargs="+", default=[None])
    p.add_argument("--shift", type=float, default=None)
    p.add_argument("--solver", nargs="+", default=["euler"], choices=list(SOLVERS))
    p.add_argument("--frames", type=int, nargs="+", default=[None],
                   help="clip lengths sampled in one pass, 1 + 4k (default: the training clips')")
    p.add_argument("--extrapolate", nargs="+", default=["none"], choices=["none", *TIME_METHODS],
                   help="the rotary time extrapolation for lengths past the trained one (sample.py --extrapolate)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "motion.json")
    args = p.parse_args(argv)
    try:
        captions = captions_for(args.captions, args.manifest)
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    results = [run_setting(run, captions, args.k, steps, cfg, args.shift, solver, args.manifest, args.device, args.batch_size,
                           frames, extrapolate)
               for run, steps, cfg, solver, frames, extrapolate in itertools.product(
                   args.runs, args.steps, args.cfg, args.solver, args.frames, args.extrapolate)]
    headers = ["run", "steps", "cfg", "solver", "frames", "extrapolate", "group", "videos", "presence", "colour",
               "shape", "direction", "linearity R2", "s / video"]
    rows = []
    for r in results:
        for group, s in r["summary"].items():
            rows.append([r["run"], r["steps"], r["cfg"], r["solver"], r["frames"], r["extrapolate"], group, s["videos"]] +
                        [f"{s[m]:.3f}" for m in ("presence", "color", "shape", "direction", "linearity")] +
                        [f"{r['sampling_s'] / r['videos']:.3f}"])
    print(markdown_table(headers, rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"captions": captions, "k": args.k, "results": results}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
