"""Tokenizer recipes side by side in the same CPU (or GPU) budget, judged on footage none of them saw.

    python bench/tokenizer_recipes.py --train ../shared/data/clips/bikes.mp4 \\
        --held-out ../shared/data/clips/carphone_pristine.mp4 --preset small --size 128 --minutes 30 \\
        --recipe "l1=--recon-loss l1" --recipe "mse=--recon-loss mse" [--work runs/tokenizer_recipes]
        [--out bench/results/tokenizer_recipes.json] [--workers 8 (on a GPU)]

(--recipe "frames9=@footage --frames 9": @footage stands for the kept real-footage recipe, FOOTAGE_RECIPE.)

Every recipe is `train.py --stage tokenizer` with the shared flags (--preset, --frames, --size, --batch-size,
--seed) plus its own (train.py's defaults for what neither gives), run alone, one after the other, for the same
wall-clock budget: a short probe run measures each recipe's own step rate first, its --steps are set so that its
learning-rate schedule ends at the budget (a run that ends well before it is reported as unfair to its recipe),
and --max-minutes stops it there in any case (the fitted linear codec, the latent statistics and the
export are outside the budget). Whole videos are held out: --train and --held-out must not share a file.

Then, on the held-out footage (and on windows of the training footage, to show the gap):
- `tokenizer.evaluate` with every recipe's model at once: PSNR, SSIM and the equal-floats baseline;
- `bench/tokenizer_diagnosis.py` per recipe: the fitted starting codec against the trained model, by frequency
  band, edges against flat areas, and the seam ratios.
Prints one table and writes the JSON (--out); the shards, runs, logs and reports stay under --work, where a
rerun reuses every finished run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import markdown_table  # noqa: E402
from training.options import build_parser  # noqa: E402

# The kept recipe for real footage (docs/tokenizers.md), on top of train.py's defaults; a --recipe's flags may name it
# as @footage, e.g. --recipe "kept=@footage" --recipe "frames9=@footage --frames 9". (--precision bf16 is CUDA's
# default already; on a CPU with AMX it steps 1.5 times as fast.)
FOOTAGE_RECIPE = ("--recon-loss mse --lr 1e-3 --warmup 50 --schedule cosine --ema-decay 0.99 --size 64 --zoom 1 4 "
                  "--hflip --boundary-weight 1.5 --precision bf16")


def training_shards(videos: list[Path], out: Path, copies: int = 1) -> Path:
    """Shards of whole videos, each captioned by its file name (the tokenizer ignores captions): `copies` shards
    that each hold every video, so that as many decoding workers each have footage to read (a worker reads only
    its own shards)."""
    from data.make_shards import Candidate, make_shards

    manifest = out / "manifest.json"
    if not manifest.is_file() or len(json.loads(manifest.read_text())["shards"]) != copies:
        make_shards([Candidate(v, v.name, v.stem) for _ in range(copies) for v in videos], out,
                    shard_size=len(videos), overwrite=True)
    return out


def run(cmd: list[str], log: Path) -> float:
    """Runs cmd from the repository root with its output in `log`; its wall time in seconds."""
    start = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        out = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if out.returncode != 0:
        raise SystemExit(f"error: {shlex.join(cmd)} failed ({out.returncode})\n{log.read_text()[-3000:]}")
    return time.perf_counter() - start


def metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def training_seconds(rows: list[dict], batch: int) -> float:
    """The optimiser steps' own time, from each logging window's steps and its samples/s."""
    total, last = 0.0, 0
    for m in rows:
        if m.get("samples_per_s"):
            total += (m["step"] - last) * batch / m["samples_per_s"]
        last = m["step"]
    return total


def parse_recipes(specs: list[str]) -> dict[str, list[str]]:
    """NAME=FLAGS items as {name: train.py flags}, @footage standing for FOOTAGE_RECIPE's flags."""
    recipes = {}
    for r in specs:
        name, _, flags = r.partition("=")
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise SystemExit(f"error: --recipe takes NAME=FLAGS with a plain name, got {r!r}")
        recipes[name] = [f for word in shlex.split(flags)
                         for f in (shlex.split(FOOTAGE_RECIPE) if word == "@footage" else [word])]
    return recipes


def probe_rate(rows: list[dict]) -> float:
    """Samples per second of a probe run: the median of its logging windows after the first (which holds the
    start-up), so that one slow window does not shorten the plan."""
    rates = [m["samples_per_s"] for m in rows if m.get("samples_per_s")]
    return statistics.median(rates[1:] or rates)


def train_recipe(name: str, flags: list[str], common: list[str], shards: Path, out: Path, minutes: float,
                 probe_steps: int, batch: int) -> dict:
    """Probe the recipe's step rate, then train it for `minutes`; what it did."""
    base = [sys.executable, "train.py", "--stage", "tokenizer", "--data", str(shards), *common, *flags,
            "--wandb", "disabled", "--no-progress", "--checkpoint-every", "0"]
    probe = out / "probes" / name
    if not (probe / "model" / "config.json").is_file():
        run(base + ["--out", str(probe), "--steps", str(probe_steps), "--log-every", str(max(1, probe_steps // 4)),
                    "--stats-batches", "1"], out / "probes" / f"{name}.log")
    rate = probe_rate(metrics(probe))
    steps = max(1, int(minutes * 60 * rate / batch))
    run_dir = out / "runs" / name
    if not (run_dir / "model" / "config.json").is_file():
        wall = run(base + ["--out", str(run_dir), "--steps", str(steps), "--max-minutes", str(minutes),
                           "--log-every", "10"], out / "runs" / f"{name}.log")
        (out / "runs" / f"{name}.wall").write_text(f"{wall:.1f}")
    wall = float((out / "runs" / f"{name}.wall").read_text())
    train_rows = [m for m in metrics(run_dir) if "loss" in m]
    return {"flags": flags, "probe_samples_per_s": rate, "planned_steps": steps, "steps": train_rows[-1]["step"],
            "wall_s": wall, "budget_used": wall / (minutes * 60), "train_s": training_seconds(train_rows, batch),
            "final_loss": train_rows[-1]["loss"], "run": str(run_dir)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=Path, nargs="+", required=True, help="training videos (whole files)")
    p.add_argument("--held-out", type=Path, nargs="+", required=True, help="evaluation videos, never trained on")
    p.add_argument("--recipe", action="append", required=True, metavar="NAME=FLAGS",
                   help="a recipe: its name, then train.py flags added to the shared ones (repeatable)")
    p.add_argument("--preset", default="small")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help="shared; a recipe may give its own")
    p.add_argument("--minutes", type=float, default=30.0, help="training budget of each recipe (wall clock)")
    p.add_argument("--probe-steps", type=int, default=20)
    p.add_argument("--windows", type=int, default=4, help="evaluation windows per video")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1,
                   help="decoding worker processes of each run, each reading its own copy of the training footage "
                        "(a GPU's steps outrun one; on two CPU cores, 1)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "tokenizer_recipes", help="shards, runs and reports")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tokenizer_recipes.json")
    args = p.parse_args(argv)
    if {v.resolve() for v in args.train} & {v.resolve() for v in args.held_out}:
        raise SystemExit("error: a video is both in --train and --held-out; hold out whole videos")
    recipes = parse_recipes(args.recipe)
    if args.workers < 1:
        raise SystemExit(f"error: --workers must be at least 1, got {args.workers}")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    shards = training_shards(args.train, work / "train" / "shards", args.workers)

    common = ["--preset", args.preset, "--frames", str(args.frames), "--size", str(args.size), "--batch-size",
              str(args.batch_size), "--seed", str(args.seed), "--num-workers", str(args.workers)]
    batches = {}  # each recipe's batch size as train.py reads its flags; a bad flag fails here, before any training
    for name, flags in recipes.items():
        batches[name] = build_parser().parse_args(["--stage", "tokenizer", "--data", str(shards), "--out", str(work),
                                                   *common, *flags]).batch_size
    trained = {}
    for name, flags in recipes.items():
        trained[name] = train_recipe(name, flags, common, shards, work, args.minutes, args.probe_steps, batches[name])
        print(f"{name}: {trained[name]['steps']} steps in {trained[name]['wall_s']:.0f} s", flush=True)

    reports = {}
    for split, videos in (("held-out", args.held_out), ("seen", args.train)):
        out = work / "eval" / split
        cmd = [sys.executable, "-m", "tokenizer.evaluate", "--frames", str(args.frames), "--size", str(args.size),
               "--windows", str(args.windows), "--out", str(out), "--no-videos"]
        for t in trained.values():
            cmd += ["--ckpt", str(Path(t["run"]) / "model")]
        data = out / "videos"  # the split's videos alone, linked
        data.mkdir(parents=True, exist_ok=True)
        for v in videos:
            if not (data / v.name).exists():
                (data / v.name).symlink_to(v.resolve())
        run(cmd + ["--data", str(data)], work / "eval" / f"{split}.log")
        reports[split] = json.loads((out / "report.json").read_text())
    diagnoses = {}
    for name, t in trained.items():
        out = work / "diagnosis" / name
        run([sys.executable, "bench/tokenizer_diagnosis.py", "--run", t["run"], "--data", str(work / "eval" / "held-out" / "videos"),
             "--frames", str(args.frames), "--size", str(args.size), "--windows", str(args.windows), "--out", str(out)],
            work / "diagnosis" / f"{name}.log")
        diagnoses[name] = json.loads((out / "report.json").read_text())["results"]

    rows = []
    start = next(iter(diagnoses.values()))["start"]
    rows.append(["start (fitted linear codec)", "0", "", "", f"{start['psnr']:.2f}", "", "",
                 f"{start['psnr_edges']:.2f} / {start['psnr_flat']:.2f}",
                 f"{start['seams']['error_ratio']:.2f} / {start['seams']['motion_ratio']:.2f}"])
    order = reports["held-out"]["order"]
    for (name, t), key in zip(trained.items(), order):
        held, seen = reports["held-out"]["tokenizers"][key]["mean"], reports["seen"]["tokenizers"][key]["mean"]
        d = diagnoses[name]["trained"]
        t |= {"held_out": held, "seen": seen, "diagnosis": diagnoses[name]}
        rows.append([name, str(t["steps"]), f"{t['train_s']:.0f}", f"{t['wall_s']:.0f}", f"{held['psnr']:.2f}", f"{held['ssim']:.4f}",
                     f"{seen['psnr']:.2f}", f"{d['psnr_edges']:.2f} / {d['psnr_flat']:.2f}",
                     f"{d['seams']['error_ratio']:.2f} / {d['seams']['motion_ratio']:.2f}"])
    base = reports["held-out"]["tokenizers"][order[0]]["mean"]
    rows.append(["equal-floats baseline", "", "", "", f"{base['baseline_psnr']:.2f}", f"{base['baseline_ssim']:.4f}",
                 f"{reports['seen']['tokenizers'][order[0]]['mean']['baseline_psnr']:.2f}", "", ""])
    print(f"\n{args.preset} at {args.size}x{args.size}, {args.frames} frames, {args.minutes:g} minutes each; trained on "
          f"{', '.join(v.name for v in args.train)}, held out {', '.join(v.name for v in args.held_out)}\n")
    print(markdown_table(["recipe", "steps", "training s", "wall s", "held-out PSNR", "held-out SSIM", "seen PSNR",
                          "held-out edges / flat PSNR", "seam error / motion"], rows))
    for name, t in trained.items():
        if t["budget_used"] < 0.9:
            print(f"\nnote: {name} ended its {t['planned_steps']} planned steps after {100 * t['budget_used']:.0f}% of "
                  f"its budget: its probe underestimated its step rate, so the comparison is not fair to it; rerun "
                  f"with more --probe-steps and a fresh --work")
    result = {"settings": {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) and v and
                               isinstance(v[0], Path) else v) for k, v in vars(args).items()},
              "recipes": trained, "start": start,
              "baseline": {"held_out": {k: base[k] for k in ("baseline_psnr", "baseline_ssim")},
                           "seen": {k: reports["seen"]["tokenizers"][order[0]]["mean"][k] for k in ("baseline_psnr", "baseline_ssim")}}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
