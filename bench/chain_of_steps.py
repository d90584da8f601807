"""The chain-of-steps study: at which solver step each attribute of a generated video is decided, and how that
moves with the number of steps, the guidance scale and the timestep shift.

    python bench/chain_of_steps.py [--ckpt runs/quickstart/dit] [--manifest runs/quickstart/shards/manifest.json]
                                   [--videos-per-prompt 3] [--seen 10] [--steps 10 60] [--guidance 1 3 5 8] [--shift 1 3 6 12]
                                   [--cascade bench/results/cascade] [--out bench/results/chain_of_steps]

For the held-out caption combinations and `--seen` of the seen ones, and seeds 0..N-1, the run samples
a video and the clean-video prediction at every solver step is decoded and scored (`evaluation.chain_of_steps`
says how). The run's own sampler setting is the base; each of steps, guidance and shift is then varied alone,
the others at the base. With `--cascade` (a `bench/cascade.py` output folder), the whole-clip model and the
cascade's keyframe model are studied the same way on the held-out captions: which decides the trajectory
(direction, linearity, position) earlier? Prints tables, writes chain_of_steps.json, chain_of_steps.md and a
PNG per comparison (accuracy along the steps, x the fraction of steps done).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import markdown_table  # noqa: E402
from evaluation.chain_of_steps import ATTRIBUTES, StepRecorder, markdown, plot_curves  # noqa: E402
from evaluation.generator import captions_for, sample_run  # noqa: E402

SHOWN = ("presence", "color", "shape", "direction", "linearity", "position")


def study(pipe, captions: list[str], seeds: int, sampler: dict, manifest: str | None, batch: int) -> dict:
    recorder = StepRecorder(pipe, manifest=manifest)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        sample_run(pipe, captions, seeds, Path(tmp), sampler, batch, on_batch=recorder.add)
    return recorder.summary() | {"sampler": sampler, "seconds": time.perf_counter() - t0}


def latent_study(pipe, captions: list[str], seeds: int, shape, sampler: dict, manifest: str | None, batch: int) -> dict:
    """The study for a model generating latents of `shape` (C, t, h, w) from text alone (the cascade's models)."""
    recorder = StepRecorder(pipe, manifest=manifest)
    jobs = [(c, s) for c in captions for s in range(seeds)]
    for start in range(0, len(jobs), batch):
        group, trajectory = jobs[start:start + batch], []
        pipe.generate_latents([c for c, _ in group], shape, seeds=[s for _, s in group],
                              on_step=lambda i, t, x0: trajectory.append((i, float(t), x0.detach().clone())), **sampler)
        recorder.add(group, trajectory)
    return recorder.summary() | {"sampler": sampler}


def rows_of(label: str, s: dict) -> list[list]:
    out = []
    groups = [g for g in ("held_out", "seen") if g in s["groups"]] or ["all"]
    for group in groups:
        g = s["groups"][group]
        out.append([label, group, g["videos"]] + [
            f"{g[a]['final']:.2f} @{g[a]['decided_fraction_mean']:.2f} "
            f"+{g[a]['corrected']}/{g[a]['ever_wrong']} -{g[a]['lost']}/{g[a]['ever_right']}" for a in SHOWN])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/chain_of_steps.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", "--run", dest="run", help="the DiT run folder to study", default=str(ROOT / "runs" / "quickstart" / "dit"))
    p.add_argument("--manifest", default=str(ROOT / "runs" / "quickstart" / "shards" / "manifest.json"))
    p.add_argument("--captions", default="all", help="holdout, train, all or a file of captions")
    p.add_argument("--seen", type=int, default=10,
                   help="with --captions all: the held-out captions and this many seen ones, evenly spread (0: all)")
    p.add_argument("--videos-per-prompt", "--seeds", dest="seeds", type=int, default=3, help="seeds 0..N-1 per caption")
    p.add_argument("--steps", type=int, nargs="*", default=[10, 60], help="solver steps tried beside the run's")
    p.add_argument("--guidance", "--cfg", dest="cfg", type=float, nargs="*", default=[1.0, 3.0, 8.0], help="guidance scales tried beside the run's")
    p.add_argument("--shift", type=float, nargs="*", default=[1.0, 3.0, 12.0], help="timestep shifts tried beside the run's")
    p.add_argument("--cascade", type=Path, default=None, help="a bench/cascade.py output folder (whole/, keyframes/)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "chain_of_steps")
    args = p.parse_args(argv)

    from pipeline import Pipeline

    args.out.mkdir(parents=True, exist_ok=True)
    manifest = args.manifest if args.manifest and Path(args.manifest).is_file() else None
    captions = captions_for(args.captions, manifest)
    if args.captions == "all" and args.seen and manifest:
        held = captions_for("holdout", manifest)
        seen = [c for c in captions if c not in held]
        captions = held + seen[::max(1, len(seen) // args.seen)][:args.seen]
    pipe = Pipeline.load(args.run, device=args.device)
    d = pipe.defaults
    base_shift = pipe.flow.shift_for(pipe.tokens(pipe.latent_shape(d["frames"], *pipe.size)))
    base = dict(steps=d["sampler"]["steps"], guidance=d["sampler"]["guidance"], shift=base_shift, solver="euler")
    settings = {"base": base}
    for factor, key in (("steps", "steps"), ("cfg", "guidance"), ("shift", "shift")):
        for value in getattr(args, factor):
            if value != base[key]:
                settings[f"{factor}={value:g}"] = base | {key: type(base[key])(value)}
    studies, table = {}, []
    for label, sampler in settings.items():
        studies[label] = study(pipe, captions, args.seeds, sampler, manifest, args.batch)
        print(f"{label}: {sampler} ({studies[label]['seconds']:.0f} s)", flush=True)
        table += rows_of(label, studies[label])
    head = ["setting", "captions", "videos"] + [f"{a}: final @decided +corrected -lost" for a in SHOWN]
    text = ["## The quickstart model", "", f"Run `{args.run}`; base sampler {base}; seeds 0-{args.seeds - 1}; "
            f"{len(captions)} captions.", "", markdown_table(head, table), ""]
    for factor, key in (("steps", "steps"), ("cfg", "guidance"), ("shift", "shift")):
        chosen = {f"{key} {s['sampler'][key]:g}": s for label, s in studies.items()
                  if label == "base" or label.startswith(factor + "=")}
        chosen = dict(sorted(chosen.items(), key=lambda kv: kv[1]["sampler"][key]))
        plot_curves(chosen, args.out / f"{factor}.png", group="held_out",
                    title=f"held-out captions: accuracy along the steps, by {key} (others at the base)")
    plot_curves({g: {"groups": {"all": studies["base"]["groups"][g]}} for g in ("seen", "held_out")
                 if g in studies["base"]["groups"]}, args.out / "seen_vs_held_out.png",
                title="base sampler: seen against held-out caption combinations")
    text.append(markdown(studies["base"], "base sampler"))

    if args.cascade is not None:
        from bench.cascade import TRAIN_FRAMES, WINDOW

        held = captions_for("holdout", args.cascade / "shards" / "manifest.json")
        cascade_manifest = str(args.cascade / "shards" / "manifest.json")
        whole, keys = (Pipeline.load(args.cascade / name, device=args.device) for name in ("whole", "keyframes"))
        shape = whole.latent_shape(TRAIN_FRAMES, *whole.size)
        sampler = dict(steps=30, guidance=5.0, shift=3.0, solver="euler")
        c, _, h, w = shape
        pair = {"whole clip (17 frames)": latent_study(whole, held, args.seeds, shape, sampler, cascade_manifest, args.batch),
                "cascade keyframes (5, 16 frames apart)": latent_study(keys, held, args.seeds, (c, WINDOW, h, w), sampler,
                                                                       cascade_manifest, args.batch)}
        studies |= {f"cascade/{k}": v for k, v in pair.items()}
        plot_curves(pair, args.out / "whole_vs_keyframes.png", group="held_out",
                    title="held-out captions: the whole-clip model against the cascade's keyframe model")
        text += ["## Whole clip against the cascade's keyframe model", "",
                 markdown_table(head, [r for label, s in pair.items() for r in rows_of(label, s)]), ""]
    for line in text:
        print(line)
    (args.out / "chain_of_steps.md").write_text("\n".join(text) + "\n")
    slim = {label: {k: v for k, v in s.items() if k != "videos"} | {"per_video": [
        {"name": v["name"], "group": v["group"], "seed": v["seed"],
         "right": {a: [int(x) for x in _right(v, a, s["width"])] for a in ATTRIBUTES}} for v in s["videos"]]}
        for label, s in studies.items()}
    (args.out / "chain_of_steps.json").write_text(json.dumps({"settings": vars(args) | {"out": str(args.out), "cascade": str(args.cascade)},
                                                               "captions": captions, "studies": slim}, indent=1, default=str))
    print(f"wrote {args.out}")
    return 0


def _right(video: dict, attribute: str, width: int) -> list[bool]:
    from evaluation.chain_of_steps import RIGHT, states

    return [s == RIGHT for s in states(video["steps"], attribute, width)]


if __name__ == "__main__":
    sys.exit(main())
