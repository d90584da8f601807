"""The quickstart, what `python train.py` with no arguments runs: the built-in synthetic shards, the tiny
tokenizer trained on them, the clips encoded to latent shards, the tiny DiT trained on those, and samples of
prompts whose caption combinations were held out of training, scored by the motion benchmark. Each part
resumes if interrupted.

    python train.py quickstart [--seed 1 --out runs/quickstart_1 ...]      # or: python quickstart.py ...
    python train.py quickstart --shapes 17x64x64 17x64x96 17x96x64 --out runs/quickstart_mixed

With --shapes the clips mix those aspect ratios (and durations): both stages train in buckets of those
shapes (tokens per batch about even), the latents are written at each clip's shape, and the samples and
their scores come at every video shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import sample
from checkpoint_io import write_json_atomic, write_text_atomic
from data.buckets import bucket_file_text, parse_buckets, scaled_batch_sizes
from data.synthetic import DEFAULT_HOLDOUT, SyntheticSpec, generate, parse_shape
from evaluation.motion_score import score_dir, table
from parallel import run_command
from tokenizer import load_vae
from tokenizer.encode import export_latents
from training.loop import train
from training.options import build_parser

log = logging.getLogger("train")

QUICKSTART_DIR = Path("runs/quickstart")
# The DiT's timestep shift, in training and sampling: which way the object moves is settled at the highest
# noise levels (t above about 0.95), where at shift 3 only about 3% of the training draws fall and at shift 6
# about 12%.
QUICKSTART_SHIFT = 6

# The tiny tokenizer's training recipe and its steps (--tokenizer-steps): the squared error, 800 steps of 4 clips
# at lr 3e-3, the frames where latent groups meet weighted 1.5 (see docs/results/tokenizer.md: held-out shape
# right in 97-98% of the reconstructions against 57% at first, seams within 1.1). bench/cascade.py trains it too.
TOKENIZER_RECIPE = ["--recon-loss", "mse", "--batch-size", "4", "--lr", "3e-3", "--warmup", "50", "--schedule", "cosine",
                    "--ema-decay", "0.99", "--latent-norm", "global", "--boundary-weight", "1.5"]
TOKENIZER_STEPS = 800


def quickstart_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py quickstart", description=(
        "The built-in demo (what `python train.py` with no arguments runs): write the synthetic shards, train "
        "the tiny tokenizer, encode the clips to latent shards, train the tiny DiT on them, and write samples "
        "for prompts whose caption combinations were held out of training. Each part resumes if interrupted."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=str(QUICKSTART_DIR), help="folder for everything it writes")
    p.add_argument("--clips", type=int, default=1200, help="synthetic clips to generate")
    p.add_argument("--tokenizer-steps", type=int, default=TOKENIZER_STEPS, help='tokenizer training steps')
    p.add_argument("--dit-steps", type=int, default=2000, help='DiT training steps')
    p.add_argument("--sample-steps", type=int, default=30, help="sampler steps for the final samples")
    p.add_argument("--samples-per-prompt", type=int, default=8, help="videos per prompt (seeds 0, 1, ...)")
    p.add_argument("--seed", type=int, default=0, help="seed of both training stages (initial weights, data order, "
                   "noise); the synthetic set is the same for every seed. Give each seed its own --out")
    p.add_argument("--object-size", type=float, nargs=2, default=list(SyntheticSpec.object_size), metavar=("MIN", "MAX"),
                   help="the moving object's width as a fraction of the frame (docs/results/length.md#the-shape: "
                        "larger objects and the shape)")
    p.add_argument("--shapes", nargs="+", default=[], metavar="FxHxW",
                   help="mix these clip shapes (e.g. 17x64x64 17x64x96 17x96x64) and train in buckets of them")
    p.add_argument("--wandb", choices=["auto", "online", "offline", "disabled"], default="disabled", help='wandb mode for both stages (online needs WANDB_API_KEY)')
    p.add_argument("--no-progress", action="store_true", help='no progress bars')
    return p


def main(argv: list[str] | None = None) -> int:
    q = quickstart_parser().parse_args(argv)
    return run_command(lambda: run(q))[0]


def run(q: argparse.Namespace) -> None:
    out = Path(q.out)
    start = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    shards, latents = out / "shards", out / "latents"
    shapes = tuple(parse_shape(s) for s in q.shapes)
    spec = SyntheticSpec(holdout=DEFAULT_HOLDOUT, shapes=shapes, object_size=tuple(q.object_size))
    manifest = shards / "manifest.json"
    written = json.loads(manifest.read_text()) if manifest.is_file() else None
    if written is None or (written["samples"], written["spec"].get("shapes", []), written["spec"].get("object_size")) != (
            q.clips, [list(s) for s in shapes], list(spec.object_size)):
        log.info("[1/4] writing %d synthetic clips (%s) to %s", q.clips,
                 ", ".join(f"{f} frames at {h}x{w}" for f, h, w in spec.clip_shapes), shards)
        generate(shards, q.clips, spec, seed=0, shard_size=max(1, q.clips // 8), overwrite=True)
    common = ["--frames", str(spec.frames), "--size", str(spec.size), "--fps", str(spec.fps), "--preset", "tiny",
              "--seed", str(q.seed), "--wandb", q.wandb, "--log-every", "50", "--checkpoint-every", "500", "--num-workers", "1"]
    common += ["--no-progress"] if q.no_progress else []
    bucket_files = {}
    if shapes:  # one bucket per shape; the largest takes the batch size the square run takes, smaller ones more
        for stage, batch in (("tokenizer", 4), ("dit", 32), ("encode", 16)):
            bucket_files[stage] = out / f"buckets_{stage}.txt"
            write_text_atomic(bucket_files[stage], bucket_file_text(scaled_batch_sizes(shapes, batch)))
    buckets = lambda stage: ["--buckets", str(bucket_files[stage])] if shapes else []  # noqa: E731
    log.info("[2/4] training the tiny tokenizer (%d steps)", q.tokenizer_steps)
    vae_run = train(build_parser().parse_args(common + buckets("tokenizer") + [
        "--stage", "tokenizer", "--data", str(shards), "--out", str(out / "tokenizer"), "--steps", str(q.tokenizer_steps),
        *TOKENIZER_RECIPE]))
    vae_dir = vae_run / "model"
    if not (latents / "done.json").is_file():
        log.info("[3/4] encoding the clips to latent shards in %s", latents)
        shutil.rmtree(latents, ignore_errors=True)
        result = export_latents(load_vae(vae_dir), shards, latents, spec.frames, spec.size,
                                fps=spec.fps, batch_size=16, shard_size=max(1, q.clips // 8), num_workers=1,
                                ckpt=str(vae_dir), buckets=parse_buckets(str(bucket_files["encode"])) if shapes else None)
        write_json_atomic(latents / "done.json", {"samples": result["samples"]})
    prompts = list(DEFAULT_HOLDOUT) + ["a red circle moving right", "a blue triangle moving left", "a white square moving down"]
    log.info("[4/4] training the tiny DiT on the latents (%d steps)", q.dit_steps)
    dit_run = train(build_parser().parse_args(common + buckets("dit") + [
        "--stage", "dit", "--latents", "--data", str(latents), "--vae", str(vae_dir), "--out", str(out / "dit"),
        "--steps", str(q.dit_steps), "--batch-size", "32", "--lr", "1e-3", "--warmup", "100", "--schedule", "cosine",
        "--ema-decay", "0.995", "--shift", str(QUICKSTART_SHIFT), "--override", "width=128", "--override", "depth=6",
        "--preview-steps", str(q.sample_steps), "--preview-prompts", *prompts]))
    log.info("sampling %d videos for each of %d prompts and scoring their motion", q.samples_per_prompt, len(prompts))
    prompt_file = out / "prompts.txt"
    write_text_atomic(prompt_file, "\n".join(prompts) + "\n")
    video_shapes = [s for s in spec.clip_shapes if s[0] > 1] if shapes else [None]
    results = {}
    for shape in video_shapes:  # the square run: its own shape; with --shapes: every video shape, side by side
        samples = out / "samples" if shape is None else out / "samples" / "x".join(map(str, shape))
        shutil.rmtree(samples, ignore_errors=True)
        size = [] if shape is None else ["--frames", str(shape[0]), "--height", str(shape[1]), "--width", str(shape[2])]
        if sample.main(["--ckpt", str(dit_run), "--prompts", str(prompt_file), "--videos-per-prompt",
                        str(q.samples_per_prompt), "--steps", str(q.sample_steps), "--out", str(samples), "--no-progress",
                        *size]) != 0:
            raise RuntimeError("sampling the trained model failed (see above)")
        results[samples] = score_dir(samples, shards / "manifest.json")
    scores_json = {str(path.relative_to(out)): {"summary": summary, "videos": [dataclasses.asdict(x) for x in scores]}
                   for path, (scores, summary) in results.items()}
    write_json_atomic(out / "motion_scores.json", scores_json if shapes else next(iter(scores_json.values())),
                      sort_keys=False)
    minutes = (time.perf_counter() - start) / 60
    print(f"\nquickstart done in {minutes:.1f} min ({len(DEFAULT_HOLDOUT)} of the {len(prompts)} prompts are caption "
          f"combinations held out of training).")
    for samples, (scores, summary) in results.items():
        print(f"\n{len(scores)} samples in {samples}; their motion scores:\n")
        print(table(summary))
    print(f"\nsample more:  python sample.py --ckpt {dit_run} --prompt \"a green square moving up\" --out samples/")
    print(f"3x as long:   python sample.py --ckpt {dit_run} --prompt \"a green square moving up\" --frames "
          f"{1 + 3 * (spec.frames - 1)} --extrapolate pi --out samples/")


if __name__ == "__main__":
    sys.exit(main())
