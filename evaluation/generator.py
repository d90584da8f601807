"""Evaluate a generator: its videos against a reference set of real clips, and against their captions.

    python -m evaluation.generator --videos DIR --reference SHARDS_OR_CLIPS --i3d i3d_torchscript.pt --out REPORT
    python -m evaluation.generator --ckpt RUN --captions holdout --videos-per-prompt 3 --reference SHARDS --i3d I3D --out REPORT
                                   [--manifest SHARDS/manifest.json] [--clip CLIP_DIR] [--steps 30 --guidance 5 --shift 3]
                                   [--trajectory]

The generated set is a folder of `NAME.mp4` with the prompt in `NAME.txt` (what `sample.py --out DIR` writes),
or a DiT run folder sampled first (K seeds per caption, into REPORT/videos/). Every video must have its caption,
and all must share one shape (frames, height, width). Reported:

- FVD against the reference, from a local I3D (as `tokenizer.evaluate`'s rFVD): the reference clips are read at
  the generated videos' shape (a window of as many frames, at their frame rate unless `--fps` says otherwise,
  the short side resized and centre-cropped to their size), so both sets are compared on the same clip shape.
  FVD is biased upwards at small counts, so both counts are reported with it, and a bootstrap interval (both
  sets resampled with replacement, seeded) shows how much it moves with the clips drawn.
- The motion scores (`evaluation.motion_score`) of videos whose captions follow the synthetic grammar, split
  into caption combinations seen in training and held out of it when `--manifest` is given.
- CLIPSIM text-video alignment from a local CLIP folder (`--clip`), per video and on average.
Writes REPORT/report.json, REPORT/report.md and REPORT/contact_sheet.png: the worst and best videos by each
per-video score, a strip of frames each.

`--trajectory` (with `--run`) also runs the chain-of-steps study on the sampled videos: the motion scores of
the clean-video prediction at every solver step (`evaluation.chain_of_steps`), into REPORT/trajectory.json,
REPORT/trajectory.md and REPORT/trajectory.png.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from checkpoint_io import atomic_path, check_writable, write_json_atomic, write_text_atomic
from data import ClipTooShortError, VideoReadError, frames_to_tensor, probe, read_clip, write_video
from data.clip_options import add_clip_options, check_clip_options
from data.sources import find_videos, video_name, window_starts
from data.synthetic import ALL_CAPTIONS, parse_caption
from errors import InputError
from evaluation.clip_score import ClipScore
from evaluation.fvd import FrechetVideoDistance, fvd_from_features, fvd_interval
from dit3d.flow import SOLVERS
from evaluation.sample_folder import Generated, find_generated
from evaluation.motion_score import Score, caption_groups, group_of, read_frames, score_frames, summarise

log = logging.getLogger("evaluation.generator")
PER_VIDEO = ("presence", "color", "shape", "direction", "linearity", "clipsim")  # the contact sheet's scores
SHEET_FRAMES, SHEET_VIDEOS = 6, 3  # frames per strip; worst and best videos per score


def common_shape(videos: list[Generated]) -> tuple[int, int, int, float]:
    """(frames, height, width, fps) shared by every video; mixed shapes are an error that counts them."""
    shapes: dict[tuple[int, int, int], list[str]] = {}
    fps = []
    for v in videos:
        info = probe(v.path)
        shapes.setdefault((info.frames, info.height, info.width), []).append(v.name)
        fps.append(info.fps)
    if len(shapes) > 1:
        found = ", ".join(f"{len(n)} of {t}x{h}x{w}" for (t, h, w), n in sorted(shapes.items()))
        raise InputError(f"the generated videos have {len(shapes)} shapes (frames x height x width: {found}): FVD "
                         f"compares one clip shape; evaluate each shape in its own folder")
    (t, h, w), = shapes
    return t, h, w, float(np.median(fps))


def reference_features(path: str, frames: int, height: int, width: int, fps: float | None, windows: int,
                       limit: int | None, fvd: FrechetVideoDistance) -> tuple[torch.Tensor, dict]:
    """I3D features (N, F) of reference windows read at the generated shape, and what was read and skipped."""
    videos, skipped = find_videos(path)
    feats, short, longest = [], [], 0
    for v in videos:
        if limit is not None and len(feats) >= limit:
            break
        try:
            starts = window_starts(v.info, frames, fps, windows)
            clips = [read_clip(v.data, frames, fps=fps, size=(height, width), start=s, info=v.info) for s in starts]
        except ClipTooShortError:
            short.append(v.name)
            longest = max(longest, v.info.frames)
            continue
        except VideoReadError as e:
            skipped.append((v.name, str(e)))
            continue
        for clip in list({c.start: c for c in clips}.values())[:None if limit is None else limit - len(feats)]:
            feats.append(fvd.features(clip.to_tensor().unsqueeze(0)))  # windows moved onto the same frames count once
    if len(feats) < 2:
        why = (f"{len(short)} of its {len(videos)} videos are shorter than {frames} frames at "
               f"{fps or 'their own'} fps (the longest has {longest})" if short else
               f"{len(videos)} readable videos, {len(skipped)} unreadable")
        raise InputError(f"the reference {path} gives {len(feats)} clip(s) of the generated shape ({frames} frames at "
                         f"{height}x{width}): {why}; FVD needs clips of the same shape (at least 2, hundreds to mean "
                         f"much): give longer reference clips or generate shorter videos")
    return torch.cat(feats), {"videos": len(videos), "clips": len(feats), "too_short": len(short),
                              "skipped": [{"video": n, "reason": r} for n, r in skipped]}


# ---- sampling a run first ---------------------------------------------------------------------------------


def captions_for(which: str, manifest: str | Path | None) -> list[str]:
    """The captions to sample: `holdout`, `train` or `all` of the synthetic set (held-out and training captions
    from its manifest), or a text file with one caption per line."""
    if which not in ("holdout", "train", "all"):
        path = Path(which)
        if not path.is_file():
            raise InputError(f"--captions {which}: neither holdout, train, all nor a file of captions")
        captions = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not captions:
            raise InputError(f"--captions {which} holds no caption")
        return captions
    held, train = caption_groups(manifest)
    if which == "holdout":
        if not held:
            raise InputError("--captions holdout needs --manifest with held-out captions (the synthetic set's manifest.json)")
        return sorted(held)
    train_list = sorted(train) if train else list(ALL_CAPTIONS)
    return train_list if which == "train" else sorted(held) + train_list


def sample_run(pipe, captions: list[str], k: int, out: Path, sampler: dict, batch: int = 16,
               on_batch=None, frames: int | None = None) -> list[tuple[str, int]]:
    """K videos per caption (seeds 0..K-1) of `frames` frames (default: the training clips') written to
    OUT/NAME.mp4 + NAME.txt; on_batch(jobs, trajectory) gets the batch's (caption, seed) pairs and the
    clean-video prediction at every step [(i, t, x0 latents)]."""
    d = pipe.defaults
    frames = frames or d["frames"]
    jobs = [(c, s) for c in captions for s in range(k)]
    out.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(jobs), batch):
        group = jobs[start:start + batch]
        trajectory = []
        z = pipe.generate([c for c, _ in group], frames, *pipe.size, seeds=[s for _, s in group],
                          on_step=lambda i, t, x0: trajectory.append((i, float(t), x0.detach().clone())), **sampler)
        for (caption, seed), video in zip(group, pipe.decode(z)):
            name = video_name(caption, seed)
            write_video(out / f"{name}.mp4", video, fps=d.get("fps") or 8.0)
            write_text_atomic(out / f"{name}.txt", caption + "\n")
        if on_batch is not None:
            on_batch(group, trajectory)
    return jobs


# ---- the evaluation ---------------------------------------------------------------------------------------


def evaluate(videos: list[Generated], *, reference: str | None = None, fvd: FrechetVideoDistance | None = None,
             clip: ClipScore | None = None, manifest: str | Path | None = None, fps: float | None = None,
             windows: int = 1, reference_clips: int | None = None, resamples: int = 200, seed: int = 0) -> dict:
    frames, height, width, own_fps = common_shape(videos)
    held, train = caption_groups(manifest)
    rows, scores, feats = [], [], []
    for v in videos:
        u8 = read_frames(v.path)  # (T, H, W, 3)
        row: dict = {"name": v.name, "caption": v.caption, "group": group_of(v.caption, held, train)}
        if parse_caption(v.caption):
            s = score_frames(u8, v.caption, v.name, row["group"])
            scores.append(s)
            row |= {m: getattr(s, m) for m in Score.METRICS}
        video = frames_to_tensor(u8)  # (3, T, H, W) in [-1, 1]
        if clip is not None:
            row["clipsim"] = clip.video(video, v.caption)
        if fvd is not None:
            feats.append(fvd.features(video.unsqueeze(0)))
        rows.append(row)
    report: dict = {"videos": rows, "shape": {"frames": frames, "height": height, "width": width, "fps": own_fps},
                    "count": len(videos)}
    if fvd is not None:
        if reference is None:
            raise InputError("FVD needs a --reference set of real clips")
        ref_fps = fps or own_fps
        real, read = reference_features(reference, frames, height, width, ref_fps, windows, reference_clips, fvd)
        fake = torch.cat(feats)
        low, high = fvd_interval(real, fake, resamples=resamples, seed=seed)
        report["fvd"] = {"value": fvd_from_features(real, fake), "interval_90": [low, high], "resamples": resamples,
                         "generated_clips": len(fake), "reference_clips": len(real), "reference_fps": ref_fps,
                         "reference": str(reference)} | {"reference_read": read}
    if scores:
        report["motion"] = summarise(scores)
    if clip is not None:
        values = [r["clipsim"] for r in rows]
        report["clipsim"] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "videos": len(values)}
    return report


def markdown(report: dict, source: str) -> str:
    s = report["shape"]
    lines = [f"# Generated videos: `{source}`", "",
             f"{report['count']} videos of {s['frames']} frames at {s['height']}x{s['width']}, {s['fps']:g} fps.", ""]
    if "fvd" in report:
        f = report["fvd"]
        lines += [f"**FVD {f['value']:.1f}** (90% bootstrap interval {f['interval_90'][0]:.1f}-{f['interval_90'][1]:.1f}, "
                  f"{f['resamples']} resamples) between {f['generated_clips']} generated and {f['reference_clips']} "
                  f"reference clips of the same shape from `{f['reference']}` at {f['reference_fps']:g} fps. FVD is "
                  f"biased upwards at small counts: compare figures only at equal counts.", ""]
    if "clipsim" in report:
        c = report["clipsim"]
        lines += [f"**CLIPSIM {c['mean']:.2f}** (std {c['std']:.2f} over {c['videos']} videos): 100 x cosine of "
                  f"CLIP's frame and caption embeddings, averaged over frames.", ""]
    if "motion" in report:
        head = ["captions", "videos", "presence", "colour", "shape", "direction", "linearity R2", "identity", "flicker"]
        lines += ["Motion scores (captions of the synthetic grammar):", "", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head)]
        for group, m in report["motion"].items():
            lines.append(f"| {group} | {m['videos']} | " + " | ".join(
                f"{m[k]:.3f}" for k in ("presence", "color", "shape", "direction", "linearity", "identity"))
                + f" | {m['flicker']:.1f} |")
        lines.append("")
    lines += ["Per-video scores are in report.json; contact_sheet.png shows the worst and best videos by each."]
    return "\n".join(lines) + "\n"


def contact_sheet(report: dict, paths: dict[str, Path], out: Path, frames: int = SHEET_FRAMES,
                  per_side: int = SHEET_VIDEOS) -> list[str]:
    """A PNG: for every per-video score, the `per_side` worst videos (left) and best (right), each a strip of
    evenly spaced frames with its name and score. Returns the scores shown."""
    from PIL import Image, ImageDraw

    rows = report["videos"]
    shown = [m for m in PER_VIDEO if any(m in r and not np.isnan(r[m]) for r in rows)]
    if not shown:
        return []
    s = report["shape"]
    scale = max(1, 96 // s["height"])
    fh, fw = s["height"] * scale, s["width"] * scale
    strip_w, label_h, pad = frames * fw, 14, 10
    block_h = label_h + per_side * (fh + label_h) + pad
    sheet = Image.new("RGB", (2 * strip_w + 3 * pad, len(shown) * block_h + pad), "white")
    draw = ImageDraw.Draw(sheet)
    index = np.unique(np.linspace(0, s["frames"] - 1, frames).round().astype(int))
    for b, metric in enumerate(shown):
        ranked = sorted((r for r in rows if metric in r and not np.isnan(r[metric])), key=lambda r: (r[metric], r["name"]))
        y0 = pad + b * block_h
        for side, chosen in enumerate((ranked[:per_side], ranked[::-1][:per_side])):
            x0 = pad + side * (strip_w + pad)
            draw.text((x0, y0), f"{'worst' if side == 0 else 'best'} by {metric}", fill="black")
            for j, r in enumerate(chosen):
                y = y0 + label_h + j * (fh + label_h)
                u8 = read_frames(paths[r["name"]])[index]
                strip = np.concatenate(list(u8), axis=1)  # (H, n W, 3)
                sheet.paste(Image.fromarray(strip).resize((len(index) * fw, fh), Image.NEAREST), (x0, y + label_h))
                draw.text((x0, y), f"{r['name']}: {r[metric]:.3f}", fill=(90, 90, 90))
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return shown


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluation.generator", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--videos", type=Path, help="a folder of generated NAME.mp4 with NAME.txt captions")
    src.add_argument("--ckpt", "--run", dest="run", type=Path, help="a DiT run folder to sample first (K seeds per caption)")
    p.add_argument("--out", type=Path, required=True, help="folder for report.json, report.md, contact_sheet.png")
    p.add_argument("--reference", help="real clips for FVD: shards, a folder of videos or one video")
    p.add_argument("--i3d", help="local TorchScript I3D (i3d_torchscript.pt); FVD is computed when given")
    p.add_argument("--clip", help="local CLIP folder (model, tokenizer, image processor); CLIPSIM when given")
    p.add_argument("--manifest", help="the synthetic set's manifest.json: splits motion scores into seen and held-out")
    add_clip_options(p, with_frames=False, with_size=False, fps_help="reference frame rate (default: the generated videos')")
    p.add_argument("--windows", type=int, default=1, help="evenly spaced reference windows per video (default 1)")
    p.add_argument("--reference-clips", type=int, default=None, help="at most this many reference clips")
    p.add_argument("--resamples", type=int, default=200, help="bootstrap resamples of the FVD interval")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    g = p.add_argument_group("sampling a run first (--run)")
    g.add_argument("--captions", default="all", help="holdout, train, all (the synthetic set's) or a file of captions")
    g.add_argument("--videos-per-prompt", "--k", dest="k", type=int, default=3, help="videos per caption, seeds 0..K-1")
    g.add_argument("--steps", type=int, default=None, help="solver steps (default: the run's)")
    g.add_argument("--guidance", "--cfg", dest="cfg", type=float, default=None, help="guidance scale (default: the run's)")
    g.add_argument("--shift", type=float, default=None, help="timestep shift (default: the run's)")
    g.add_argument("--solver", default=None, choices=list(SOLVERS), help="with --run: the ODE solver (default: the run's)")
    g.add_argument("--batch-size", type=int, default=16, help='with --run: videos sampled together (memory, never the result)')
    g.add_argument("--trajectory", action="store_true",
                   help="also score the clean-video prediction at every solver step (the chain-of-steps study)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help='cpu, cuda, cuda:N (default: cuda when available)')
    return p


def run(args) -> dict:
    from evaluation.chain_of_steps import StepRecorder, markdown as steps_markdown, plot_curves

    check_clip_options(args)
    if args.trajectory and args.run is None:
        raise InputError("--trajectory needs --run: the trajectory is recorded while sampling")
    if args.i3d and not args.reference:
        raise InputError("--i3d computes FVD against a --reference set of real clips: give one")
    check_writable(args.out)  # before anything is sampled or scored: a wrong --out fails now
    fvd = FrechetVideoDistance.from_local(args.i3d, args.device) if args.i3d else None
    clip = ClipScore.from_local(args.clip, args.device) if args.clip else None
    folder, source = args.videos, str(args.videos)
    study = None
    if args.run is not None:
        from pipeline import Pipeline

        captions = captions_for(args.captions, args.manifest)
        pipe = Pipeline.load(args.run, device=args.device)
        d = pipe.defaults
        sampler = dict(steps=args.steps or d["sampler"]["steps"],
                       guidance=d["sampler"]["guidance"] if args.cfg is None else args.cfg,
                       shift=args.shift, solver=args.solver)
        folder, source = args.out / "videos", f"{args.run} ({len(captions)} captions x {args.k} seeds)"
        recorder = StepRecorder(pipe, manifest=args.manifest) if args.trajectory else None
        sample_run(pipe, captions, args.k, folder, sampler, args.batch_size,
                   on_batch=recorder.add if recorder else None)
        if recorder is not None:
            study = recorder.summary() | {"run": str(args.run), "sampler": sampler | {
                "shift": pipe.flow.shift_for(pipe.tokens(pipe.latent_shape(d["frames"], *pipe.size)))
                if args.shift is None else args.shift}}
    videos = find_generated(folder)
    report = evaluate(videos, reference=args.reference, fvd=fvd, clip=clip, manifest=args.manifest, fps=args.fps,
                      windows=args.windows, reference_clips=args.reference_clips, resamples=args.resamples,
                      seed=args.seed)
    report["source"] = source
    args.out.mkdir(parents=True, exist_ok=True)
    report["contact_sheet"] = contact_sheet(report, {v.name: v.path for v in videos}, args.out / "contact_sheet.png")
    write_json_atomic(args.out / "report.json", report)
    text = markdown(report, source)
    write_text_atomic(args.out / "report.md", text)
    print(text)
    if study is not None:
        write_json_atomic(args.out / "trajectory.json", study)
        write_text_atomic(args.out / "trajectory.md", steps_markdown(study))
        plot_curves({"": study}, args.out / "trajectory.png")
        print(steps_markdown(study))
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        run(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
