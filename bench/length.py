"""The length benchmark: one model at 1x, 2x, 3x and 4x its trained clip length, in one pass (with and without
each time extrapolation) against window-by-window extension, on the same captions and seeds.

    python bench/length.py --ckpt runs/quickstart/dit --manifest runs/quickstart/shards/manifest.json
                           [--captions holdout] [--k 2] [--lengths 1 2 3 4] [--modes none riflex pi extend]
                           [--cost] [--out bench/results/length_quickstart]

Quality: for every length (a multiple of the trained token frames, in frames 1 + 4k) and mode, K videos per
caption (seeds 0..K-1) are sampled with the run's sampler and scored from their pixels
(`evaluation.motion_score`): presence, colour, shape, direction, the trajectory's R², identity (the share of
frames whose object keeps its most common colour and shape) and the wall time per clip (the videos of a
setting are sampled in one batch, beside nothing else). Modes: `none`, `riflex`, `ntk`, `pi` (sample.py
--extrapolate; a model trained with train.py --extrapolate keeps its own, and only `none` is run), and `extend`
(sample.py --extend from a first window sampled from the text: each next window given the last half of the
previous; needs a model trained with --condition extend=P). A figure draws one video's object position along
its motion, in every mode, at each length, against the straight line it should follow.

Cost (`--cost`): in fresh processes, one video of each length sampled in one pass (two solver steps with
guidance, then decoded chunk by chunk): the DiT's tokens per second and the peak memory of the whole, and of
the decoding alone, which the chunked decoder keeps flat in the length.

Writes OUT.json (settings, summaries, per-video scores and tracks), OUT.md (the tables) and OUT.png.
`--combine A.json B.json ...` (runs of one recipe, e.g. three training seeds) writes OUT.md with the mean and
the range over the runs of each length and mode.

    python bench/length.py --combine bench/results/length_seed0.json length_seed1.json length_seed2.json --out bench/results/length_seeds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import markdown_table, measure_in_subprocess, time_or_memory  # noqa: E402
from dit3d.rope import METHODS as TIME_METHODS  # noqa: E402
from errors import InputError  # noqa: E402

MODES = ("none", *TIME_METHODS, "extend")
METRICS = ("presence", "color", "shape", "direction", "linearity", "identity")


def length_frames(pipe, multiple: int) -> int:
    """Frames (1 + 4k) of a clip `multiple` times the trained one in token frames."""
    trained = pipe.trained_frames
    factor = pipe.vae.config.temporal_factor
    return 1 + (trained - 1) * multiple if (trained - 1) % factor == 0 else trained * multiple


def generate(pipe, mode: str, captions: list[str], seeds: list[int], frames: int, sampler: dict) -> torch.Tensor:
    """Latents (B, C, t, h, w) of `frames`-frame clips: in one pass, or (extend) window by window."""
    trained_frames = pipe.trained_frames
    if mode != "extend":
        pipe.extrapolate_time(None if mode == "none" else mode, frames)
        return pipe.generate(captions, frames, *pipe.size, seeds=seeds, **sampler)
    pipe.extrapolate_time(None, trained_frames)
    first = pipe.generate(captions, trained_frames, *pipe.size, seeds=seeds, **sampler)
    window = first.shape[2]
    add = pipe.latent_shape(frames, *pipe.size)[1] - window
    if add <= 0:
        return first
    return pipe.extend(first, captions, add, window=window, context=max(1, window // 2), seeds=seeds, **sampler)


def track(frames: np.ndarray, direction: str) -> list[float | None]:
    """The object's position along its motion axis in every frame (pixels), None where none is found."""
    from data.synthetic import DIRECTIONS
    from evaluation.motion_score import object_centres

    axis = 0 if DIRECTIONS[direction][0] else 1
    return [None if c is None else c[axis] for c in object_centres(frames)]


def quality(pipe, mode: str, multiple: int, captions: list[str], k: int, held: set, train: set) -> dict:
    from data import tensor_to_frames
    from data.synthetic import parse_caption
    from evaluation.motion_score import group_of, score_frames, summarise

    frames = length_frames(pipe, multiple)
    d = pipe.defaults["sampler"]
    sampler = dict(steps=d["steps"], guidance=d["guidance"], solver=d.get("solver", "euler"))
    jobs = [(c, s) for c in captions for s in range(k)]
    t0 = time.perf_counter()
    z = generate(pipe, mode, [c for c, _ in jobs], [s for _, s in jobs], frames, sampler)
    videos = [tensor_to_frames(v) for v in pipe.decode(z)]
    seconds = (time.perf_counter() - t0) / len(jobs)
    scores = [score_frames(v, c, name=f"{c} #{s}", seen=group_of(c, held, train)) for v, (c, s) in zip(videos, jobs)]
    tracks = [track(v, parse_caption(c)[2]) for v, (c, _) in zip(videos, jobs)]
    return {"mode": mode, "multiple": multiple, "frames": frames, "videos": len(jobs), "s_per_video": seconds,
            "summary": summarise(scores), "scores": [dataclasses.asdict(s) for s in scores], "tracks": tracks,
            "jobs": jobs}


def measure(spec: dict) -> dict:
    """Worker: one video of spec["frames"] frames in one pass (2 steps with guidance), then its chunked decoding;
    spec["part"] is "sample" (the whole) or "decode" (decoding alone)."""
    from pipeline import Pipeline

    torch.set_num_threads(spec["threads"])
    pipe = Pipeline.load(spec["ckpt"])
    caption, frames = spec["caption"], spec["frames"]

    def generate():
        return pipe.generate([caption], frames, *pipe.size, seeds=[0], steps=2, guidance=5.0)

    def decode(z):
        for _ in pipe.decode_chunks(z[0]):
            pass

    given = generate() if spec["part"] == "decode" else None  # decoding alone: latents made once, outside

    def run():
        decode(given if given is not None else generate())

    out = time_or_memory(run, spec | {"repeats": 2}, torch.device("cpu"))
    if spec["part"] == "sample" and "seconds" in out:  # the DiT's share: its forward passes alone, timed once more
        t0 = time.perf_counter()
        generate()
        tokens = pipe.tokens(pipe.latent_shape(frames, *pipe.size))
        out["tokens_per_s"] = tokens * 2 * 2 / (time.perf_counter() - t0)  # 2 steps, prompt and null condition
    return out | {"measure": spec["measure"]}


def cost(ckpt: str, caption: str, frame_counts: list[int], tokens: list[int]) -> list[dict]:
    rows = []
    for frames, n in zip(frame_counts, tokens):
        spec = {"ckpt": ckpt, "caption": caption, "frames": frames, "threads": torch.get_num_threads()}
        whole = measure_in_subprocess(__file__, spec | {"part": "sample"})
        dec = measure_in_subprocess(__file__, spec | {"part": "decode"}, measures=("memory",))
        rows.append({"frames": frames, "tokens": n, "tokens_per_s": whole["tokens_per_s"], "seconds": whole["seconds"],
                     "peak_mb": whole["peak_mb"], "decode_peak_mb": dec["peak_mb"]})
    return rows


def figure(results: list[dict], out: Path) -> None:
    """One video (the first caption, seed 0) per length and mode: position along its motion against time, with
    the least-squares line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    multiples = sorted({r["multiple"] for r in results})
    fig, axes = plt.subplots(1, len(multiples), figsize=(4 * len(multiples), 3.2), squeeze=False)
    for ax, m in zip(axes[0], multiples):
        for r in (r for r in results if r["multiple"] == m):
            points = [(i, y) for i, y in enumerate(r["tracks"][0]) if y is not None]
            if len(points) < 2:
                continue
            x, y = np.array(points, dtype=float).T
            line, = ax.plot(x, y, ".", ms=3, label=f"{r['mode']}")
            ax.plot(x, np.polyval(np.polyfit(x, y, 1), x), "-", lw=0.8, color=line.get_color())
        ax.set_title(f"{results[0]['jobs'][0][0]} (seed 0), {m}x: {next(r['frames'] for r in results if r['multiple'] == m)} frames",
                     fontsize=8)
        ax.set_xlabel("frame")
        ax.set_ylabel("position along the motion (px)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def tables(results: list[dict], costs: list[dict]) -> str:
    headers = ["frames (x trained)", "mode", "videos", *["R²" if m == "linearity" else m for m in METRICS], "s / video"]
    rows = []
    for r in results:
        s = r["summary"].get("held_out") if r["summary"].get("held_out", {}).get("videos") else r["summary"]["all"]
        rows.append([f"{r['frames']} ({r['multiple']}x)", r["mode"], s["videos"], *[f"{s[m]:.3f}" for m in METRICS],
                     f"{r['s_per_video']:.2f}"])
    text = markdown_table(headers, rows)
    if costs:
        text += "\n\n" + markdown_table(
            ["frames", "tokens", "DiT tokens / s", "2 steps + decode (s)", "peak MiB", "decoding alone, peak MiB"],
            [[c["frames"], c["tokens"], f"{c['tokens_per_s']:.0f}", f"{c['seconds']:.2f}", f"{c['peak_mb']:.0f}",
              f"{c['decode_peak_mb']:.0f}"] for c in costs])
    return text


def combined(files: list[Path]) -> str:
    """The held-out scores of several runs' OUT.json side by side: mean [lowest, highest] per length and mode."""
    runs = [json.loads(Path(f).read_text()) for f in files]
    keys = [(r["multiple"], r["mode"], r["frames"]) for r in runs[0]["results"]]
    headers = ["frames (x trained)", "mode", "runs", *["R²" if m == "linearity" else m for m in METRICS]]
    rows = []
    for multiple, mode, frames in keys:
        found = [next((r for r in run["results"] if (r["multiple"], r["mode"]) == (multiple, mode)), None) for run in runs]
        summaries = [f["summary"].get("held_out") if f["summary"].get("held_out", {}).get("videos") else f["summary"]["all"]
                     for f in found if f is not None]
        cells = []
        for m in METRICS:
            values = [s[m] for s in summaries]
            cells.append(f"{np.mean(values):.3f} [{min(values):.2f}, {max(values):.2f}]")
        rows.append([f"{frames} ({multiple}x)", mode, len(summaries), *cells])
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help="a train.py DiT run folder")
    p.add_argument("--manifest", help="the training shards' manifest.json (seen / held-out split)")
    p.add_argument("--captions", default="holdout", help="holdout, train, all (the synthetic set's) or a file of captions")
    p.add_argument("--videos-per-prompt", "--k", dest="k", type=int, default=2, help="videos per caption")
    p.add_argument("--lengths", type=int, nargs="+", default=[1, 2, 3, 4], help="multiples of the trained length")
    p.add_argument("--modes", nargs="+", default=["none", "riflex", "pi", "extend"], choices=MODES,
                   help="one pass with each time extrapolation (none: as trained), or window-by-window extension")
    p.add_argument("--cost", action="store_true", help="also measure tokens/s and peak memory at each length")
    p.add_argument("--combine", type=Path, nargs="+", help="OUT.json files of several runs: their table of means")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "length")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return 0
    if args.combine:
        text = combined(args.combine)
        print(text)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text + "\n")
        return 0
    if not args.ckpt:
        p.error("--ckpt is required")
    from evaluation.generator import captions_for
    from evaluation.motion_score import caption_groups
    from pipeline import Pipeline

    try:
        captions = captions_for(args.captions, args.manifest)
        pipe = Pipeline.load(args.ckpt)
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    held, train = caption_groups(args.manifest)
    modes = list(args.modes)
    if pipe.trained_time_scaling is not None:
        modes = [m for m in modes if m in ("none", "extend")]  # its own frequencies are part of the model
    if "extend" in modes and not pipe.model.dit.config.frame_conditioning:
        print("note: extend left out: the model was trained without frame conditioning (--condition extend=P)")
        modes.remove("extend")
    results = []
    for multiple in args.lengths:
        for mode in modes if multiple > 1 else ["none"]:  # at the trained length every mode is the model itself
            results.append(quality(pipe, mode, multiple, captions, args.k, held, train))
            s = results[-1]["summary"]["all"]
            print(f"{results[-1]['frames']} frames, {mode}: " + ", ".join(f"{m} {s[m]:.3f}" for m in METRICS), flush=True)
    costs = []
    if args.cost:
        frames = [length_frames(pipe, m) for m in args.lengths]
        tokens = [pipe.tokens(pipe.latent_shape(f, *pipe.size)) for f in frames]
        costs = cost(args.ckpt, captions[0], frames, tokens)
    text = tables(results, costs)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure(results, args.out.with_suffix(".png"))
    args.out.with_suffix(".json").write_text(json.dumps({"ckpt": args.ckpt, "captions": captions, "k": args.k,
                                                         "results": results, "cost": costs}, indent=1))
    args.out.with_suffix(".md").write_text(text + "\n")
    print(f"wrote {args.out.with_suffix('.json')}, .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
