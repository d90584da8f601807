"""The cascade experiment: whole-clip generation against keyframes-then-interpolation, at equal training compute.

    python bench/cascade.py [--vae TOKENIZER_DIR] [--steps 2000] [--clips 1200] [--videos-per-prompt 8] [--out bench/results/cascade]

Both designs are trained here, on the synthetic set, from the same latent clips: clips of 65 frames (4x the
17-frame training window) are encoded once by the frozen tokenizer into 17 latent frames each.

(a) whole clip: one DiT trained `--steps` steps on windows of 5 latent frames (17 frames), half of them
    text-only (generation from nothing) and half with the first m frames given (extension). A clip is
    generated in one pass; longer clips by extension, each window given the last 2 latent frames so far.
(b) cascade: a keyframe DiT trained `--steps / 2` steps on every 4th latent frame of the long clips (the
    clip subsampled in time: 5 keyframes 16 frames apart), and an interpolation DiT trained `--steps / 2`
    steps on windows of 5 latent frames with the first and last given. A clip is its keyframes, then each gap
    filled independently from its two neighbouring keyframes only.

The three DiTs have the same size and batch and see the same number of tokens per step, so (a) and (b) cost
the same to train. For each caption (the held-out combinations and some seen ones) and seed, each design
makes one 65-frame clip; its first 17 and 33 frames are the 1x and 2x clips (the causal tokenizer and the
left-to-right construction of both designs make a shorter clip a prefix of a longer one). All are scored by
`evaluation.motion_score`. Prints a table per length and writes cascade.json, cascade.md, the videos, and
trajectories.png (the object's centre along the caption's axis, frame by frame, for a few samples).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import markdown_table  # noqa: E402
from tokenizer import load_vae

TRAIN_FRAMES, LONG_FRAMES, WINDOW, KEY_STRIDE, CONTEXT = 17, 65, 5, 4, 2
LENGTHS = {"1x": 17, "2x": 33, "4x": 65}
METHODS = ("whole", "cascade")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/cascade.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cascade")
    p.add_argument("--vae", type=Path, default=None,
                   help="a trained tokenizer (default: the quickstart's, trained here if missing)")
    p.add_argument("--clips", type=int, default=1200, help="synthetic 65-frame clips to train on")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=2000, help="training steps of (a); (b)'s two models get half each")
    p.add_argument("--keyframe-steps", type=int, default=None,
                   help="override (b)'s keyframe model steps (default --steps / 2: equal compute)")
    p.add_argument("--interpolate-steps", type=int, default=None,
                   help="override (b)'s interpolation model steps (default --steps / 2: equal compute)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--videos-per-prompt", "--k", dest="k", type=int, default=8, help="seeds per caption")
    p.add_argument("--seen-captions", type=int, default=3, help="seen captions scored beside the held-out ones")
    p.add_argument("--sample-steps", type=int, default=30)
    p.add_argument("--guidance", "--cfg", dest="cfg", type=float, default=5.0)
    p.add_argument("--batch", type=int, default=16, help="videos sampled together")
    p.add_argument("--tokenizer-steps", type=int, default=None,
                   help="when a tokenizer has to be trained, with the quickstart's recipe (default: the quickstart's steps)")
    p.add_argument("--wandb", default="disabled")
    return p


# ---- data and training ----------------------------------------------------------------------------------


def prepare_data(args) -> tuple[Path, Path, Path]:
    """Synthetic 65-frame clips, a tokenizer, and the clips' latents: (manifest, tokenizer dir, latent shards)."""
    from data.synthetic import DEFAULT_HOLDOUT, SyntheticSpec, generate
    from tokenizer import CausalVAE
    from tokenizer.encode import export_latents
    from quickstart import TOKENIZER_RECIPE, TOKENIZER_STEPS
    from training.loop import train
    from training.options import build_parser

    out = args.out
    spec = SyntheticSpec(frames=LONG_FRAMES, size=args.size, speed=(0.5, 0.65), holdout=DEFAULT_HOLDOUT)
    shards, latents = out / "shards", out / "latents"
    manifest = shards / "manifest.json"
    if not manifest.is_file() or json.loads(manifest.read_text())["samples"] != args.clips:
        shutil.rmtree(shards, ignore_errors=True)
        generate(shards, args.clips, spec, seed=1, shard_size=max(1, args.clips // 8))
    vae = args.vae
    if vae is None:
        vae = ROOT / "runs" / "quickstart" / "tokenizer" / "model"
        if not (vae / "config.json").is_file():
            run = train(build_parser().parse_args([
                "--stage", "tokenizer", "--data", str(shards), "--out", str(out / "tokenizer"), "--preset", "tiny",
                "--frames", str(TRAIN_FRAMES), "--size", str(args.size), "--fps", str(spec.fps),
                "--steps", str(args.tokenizer_steps or TOKENIZER_STEPS), *TOKENIZER_RECIPE, "--wandb", args.wandb,
                "--num-workers", "1", "--checkpoint-every", "0", "--no-progress"]))
            vae = run / "model"
    if not (latents / "done.json").is_file():
        shutil.rmtree(latents, ignore_errors=True)
        result = export_latents(load_vae(vae), shards, latents, LONG_FRAMES, args.size, fps=spec.fps,
                                batch_size=8, shard_size=max(1, args.clips // 8), num_workers=1, ckpt=str(vae))
        (latents / "done.json").write_text(json.dumps({"samples": result["samples"], "tokenizer": str(vae)}))
    return manifest, vae, latents


def train_models(args, vae: Path, latents: Path) -> dict[str, Path]:
    """(a) `whole`, and (b)'s `keyframes` and `interpolate`, at equal training compute."""
    from training.loop import train
    from training.options import build_parser

    half = max(1, args.steps // 2)
    common = ["--stage", "dit", "--latents", "--data", str(latents), "--vae", str(vae), "--preset", "tiny",
              "--override", f"width={args.width}", "--override", f"depth={args.depth}", "--frames", str(TRAIN_FRAMES),
              "--size", str(args.size), "--fps", "8", "--batch-size", str(args.batch_size), "--lr", "1e-3",
              "--warmup", str(min(100, max(1, half // 10))), "--schedule", "cosine", "--ema-decay", "0.995",
              "--shift", "3", "--latent-window", str(WINDOW), "--guidance", str(args.cfg),
              "--preview-steps", str(args.sample_steps), "--preview-prompts", "a red circle moving right",
              "--wandb", args.wandb, "--num-workers", "1", "--log-every", "50", "--checkpoint-every", "500",
              "--no-progress"]
    plans = {"whole": ["--steps", str(2 * half), "--condition", "extend=0.5"],
             "keyframes": ["--steps", str(args.keyframe_steps or half), "--latent-stride", str(KEY_STRIDE)],
             "interpolate": ["--steps", str(args.interpolate_steps or half), "--condition", "interpolate=1.0"]}
    runs, seconds = {}, {}
    for name, extra in plans.items():
        t0 = time.perf_counter()
        runs[name] = train(build_parser().parse_args(common + ["--out", str(args.out / name)] + extra))
        seconds[name] = time.perf_counter() - t0
    (args.out / "train_seconds.json").write_text(json.dumps(seconds, indent=2))
    return runs


# ---- generation -----------------------------------------------------------------------------------------


def generate_whole(pipe, prompts: list[str], seeds: list[int], latent_frames: int, size: int,
                   sampler: dict) -> torch.Tensor:
    """(a): the first window from text alone, then extension window by window."""
    from pipeline import derived_seed

    first = pipe.generate_latents(prompts, pipe.latent_shape(TRAIN_FRAMES, size, size), seeds=seeds, **sampler)
    if latent_frames <= WINDOW:
        return first[:, :, :latent_frames]
    return pipe.extend(first, prompts, latent_frames - WINDOW, window=WINDOW, context=CONTEXT,
                       seeds=[derived_seed(s, "whole") for s in seeds], **sampler)


def generate_cascade(keys_pipe, fill_pipe, prompts: list[str], seeds: list[int], latent_frames: int, size: int,
                     sampler: dict) -> torch.Tensor:
    """(b): keyframes every KEY_STRIDE latent frames, then each gap from its two neighbours only."""
    from pipeline import derived_seed

    c, _, h, w = keys_pipe.latent_shape(TRAIN_FRAMES, size, size)
    keys = keys_pipe.generate_latents(prompts, (c, WINDOW, h, w), seeds=seeds, **sampler)
    gaps = (latent_frames - 1) // KEY_STRIDE
    if gaps > WINDOW - 1:
        raise ValueError(f"the keyframe model makes {WINDOW} keyframes: at most {(WINDOW - 1) * KEY_STRIDE + 1} latent frames")
    parts = [keys[:, :, :1]]
    shape = (c, KEY_STRIDE + 1, h, w)
    for g in range(gaps):
        given = fill_pipe.condition(shape, {0: keys[:, :, g:g + 1], -1: keys[:, :, g + 1:g + 2]})
        gap = fill_pipe.generate_latents(prompts, shape, seeds=[derived_seed(s, "gap", g) for s in seeds],
                                         given=given, **sampler)
        parts.append(gap[:, :, 1:])
    return torch.cat(parts, dim=2)


def sample_all(args, runs: dict[str, Path], captions: list[str]) -> dict[str, dict[str, Path]]:
    """Videos for every method, caption and seed, written as METHOD_LENGTH/NAME.mp4 with NAME.txt."""
    from data import write_video
    from pipeline import Pipeline

    pipes = {name: Pipeline.load(run) for name, run in runs.items()}
    latent_frames = (LENGTHS["4x"] - 1) // 4 + 1
    sampler = dict(steps=args.sample_steps, guidance=args.cfg)
    jobs = [(c, seed) for c in captions for seed in range(args.k)]
    dirs = {m: {length: args.out / "videos" / f"{m}_{length}" for length in LENGTHS} for m in METHODS}
    for m in METHODS:
        for d in dirs[m].values():
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
    for start in range(0, len(jobs), args.batch):
        group = jobs[start:start + args.batch]
        prompts, seeds = [c for c, _ in group], [s for _, s in group]
        made = {"whole": generate_whole(pipes["whole"], prompts, seeds, latent_frames, args.size, sampler),
                "cascade": generate_cascade(pipes["keyframes"], pipes["interpolate"], prompts, seeds, latent_frames,
                                            args.size, sampler)}
        for m, z in made.items():
            videos = pipes["whole"].decode(z)
            for (caption, seed), video in zip(group, videos):
                name = f"{caption.replace(' ', '_')}_{seed}"
                for length, frames in LENGTHS.items():
                    write_video(dirs[m][length] / f"{name}.mp4", video[:, :frames], fps=8.0)
                    (dirs[m][length] / f"{name}.txt").write_text(caption + "\n")
    return dirs


# ---- report ---------------------------------------------------------------------------------------------


def trajectory_figure(dirs: dict[str, dict[str, Path]], captions: list[str], path: Path, samples: int = 4,
                      panel: int = 360) -> None:
    """A PNG: per method, the object's centre along the caption's axis over the 4x clip, one line per sample;
    the cascade's keyframes are marked by dotted lines."""
    from PIL import Image, ImageDraw

    from evaluation.motion_score import object_centres, read_frames
    from data.synthetic import DIRECTIONS, parse_caption

    palette = [(230, 60, 60), (60, 170, 80), (60, 110, 235), (210, 160, 30), (150, 80, 200), (40, 170, 180)]
    pad, frames = 40, LENGTHS["4x"]
    image = Image.new("RGB", (2 * panel + 3 * pad, panel + 2 * pad + 12 * samples), "white")
    draw = ImageDraw.Draw(image)
    names = sorted(p.stem for p in dirs["whole"]["4x"].glob("*.mp4"))
    chosen = [n for c in captions for n in names if n.startswith(c.replace(" ", "_"))][:: max(1, len(names) // samples)]
    for col, m in enumerate(METHODS):
        x0, y0 = pad + col * (panel + pad), pad
        draw.rectangle([x0, y0, x0 + panel, y0 + panel], outline="black")
        draw.text((x0, y0 - 30), f"{m}: centre along the caption's axis, frames 0-{frames - 1}", fill="black")
        if m == "cascade":
            for f in range(0, frames, 4 * KEY_STRIDE):
                fx = x0 + panel * f / (frames - 1)
                for y in range(y0, y0 + panel, 6):
                    draw.line([fx, y, fx, y + 2], fill=(150, 150, 150))
        for i, name in enumerate(chosen[:samples]):
            caption = (dirs[m]["4x"] / f"{name}.txt").read_text().strip()
            frames_u8 = read_frames(dirs[m]["4x"] / f"{name}.mp4")
            dx, dy = DIRECTIONS[parse_caption(caption)[2]]
            axis, sign = (0, dx) if dx else (1, dy)
            size = frames_u8.shape[1]
            points = []
            for f, centre in enumerate(object_centres(frames_u8)):
                if centre is not None:  # progress along the caption's direction, 0 to 1 of the frame
                    progress = centre[axis] / size if sign > 0 else 1 - centre[axis] / size
                    points.append((x0 + panel * f / (frames - 1), y0 + panel * (1 - progress)))
            if len(points) > 1:
                draw.line(points, fill=palette[i % len(palette)], width=2)
            draw.text((x0 + 5, y0 + panel + 5 + 12 * i), name, fill=palette[i % len(palette)])
    image.save(path)


def report(args, dirs: dict, manifest: Path, captions: list[str]) -> dict:
    from evaluation.motion_score import score_dir

    rows, results = [], {}
    for length in LENGTHS:
        for m in METHODS:
            scores, summary = score_dir(dirs[m][length], manifest)
            results[f"{m}_{length}"] = {"summary": summary, "videos": [s.__dict__ for s in scores]}
            for group in ("all", "held_out"):
                if group in summary:
                    s = summary[group]
                    rows.append([length, m, group, s["videos"], f"{s['presence']:.3f}", f"{s['color']:.3f}",
                                 f"{s['direction']:.3f}", f"{s['linearity']:.3f}", f"{s['identity']:.3f}",
                                 f"{s['area_cv']:.3f}", f"{s['color_spread']:.1f}", f"{s['flicker']:.2f}"])
    headers = ["length", "method", "captions", "videos", "presence", "colour", "direction", "linearity R2",
               "identity", "area CV", "colour spread", "flicker"]
    table = markdown_table(headers, rows)
    print(table)
    trajectory_figure(dirs, captions, args.out / "trajectories.png")
    train_seconds = json.loads((args.out / "train_seconds.json").read_text())
    steps = {name: json.loads((args.out / name / "config.json").read_text())["args"]["steps"]
             for name in ("whole", "keyframes", "interpolate")}
    print(f"training steps (same model size, batch and tokens per step): {steps}")
    record = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "captions": captions, "train_steps": steps, "train_seconds": train_seconds, "results": results}
    (args.out / "cascade.json").write_text(json.dumps(record, indent=2))
    (args.out / "cascade.md").write_text(table + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    import logging

    from data.synthetic import DEFAULT_HOLDOUT

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    manifest, vae, latents = prepare_data(args)
    runs = train_models(args, vae, latents)
    train_captions = json.loads(manifest.read_text())["train_captions"]
    captions = list(DEFAULT_HOLDOUT) + [c for c in train_captions[::7]][:args.seen_captions]
    t1 = time.perf_counter()
    dirs = sample_all(args, runs, captions)
    t2 = time.perf_counter()
    report(args, dirs, manifest, captions)
    print(f"\ndata and training {(t1 - t0) / 60:.1f} min, sampling {(t2 - t1) / 60:.1f} min; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
